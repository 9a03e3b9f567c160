"""The BPS network B_phi(t, c_add): a UNet-shaped CNN that turns a condition image and the UNet's
time embedding into one residual map per port.

The module tree mirrors the official release's ``control_model`` name for name and shape for shape,
so that an official state dict loads after stripping its prefix (see :mod:`bps.convert_official`).
Only parameters the official network actually uses are created: the zero convs of the conv_in and
Downsample encoder blocks, and the ``res_weights`` scalars (omega lives in the adapter file, not in
the network), are not. As in the official network, the middle port's zero conv is the last entry
of ``zero_blocks`` (``zero_blocks.12`` for SD1.5), not a child of ``middle_block``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .errors import HintError
from .ports import SD15_PORTS, bps_problem, port_map
from .small_map_conv import SmallMapConv2d
from .unet_shape import SD15_SHAPE, UNetShape


@dataclass(frozen=True)
class BPSConfig:
    """Architecture of a BPS network. The defaults are the official SD1.5 sketch configuration.

    Attributes:
        hint_channels: channels of the condition image: 1 (sketch), 3 (layout, segmentation, style)
            or, for the official style2 configuration, 24 (a map at latent resolution, downscale 1).
        extra_channels: channels of the style variant's extra map (0 = no extra map).
        extra_downscale: pixel-unshuffle factor of the extra map.
        model_channels: width of the first level; must match the UNet's (320 for SD1.5).
        channel_mult: width multiplier per level.
        num_res_blocks: ResBlocks per encoder level (the decoder has one more per level).
        time_embed_dim: width of the UNet time embedding the network consumes (1280 for SD1.5).
        downscale: pixel-unshuffle factor of the hint; the VAE's factor (8) so the hint lands
            at latent resolution, or 1 for a hint that already is at latent resolution.
    """

    hint_channels: int = 1
    extra_channels: int = 0
    extra_downscale: int = 8
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    time_embed_dim: int = 1280
    downscale: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        problems = []
        if self.hint_channels < 1:
            problems.append(f"hint_channels must be >= 1, got {self.hint_channels}")
        if self.extra_channels < 0:
            problems.append(f"extra_channels must be >= 0, got {self.extra_channels}")
        if self.downscale < 1 or self.extra_downscale < 1:
            problems.append("downscale factors must be >= 1")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            problems.append(f"channel_mult must be positive integers, got {self.channel_mult}")
        if self.num_res_blocks < 1:
            problems.append(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.model_channels < 32 or self.model_channels % 32:
            problems.append(f"model_channels must be a positive multiple of 32 (GroupNorm has 32 groups), "
                            f"got {self.model_channels}")
        if self.time_embed_dim < 1:
            problems.append(f"time_embed_dim must be >= 1, got {self.time_embed_dim}")
        if problems:
            raise ValueError("invalid BPS network config: " + "; ".join(problems))

    @property
    def in_channels(self) -> int:
        """Channels entering the first conv after pixel-unshuffling hint and extra map."""
        return self.hint_channels * self.downscale ** 2 + self.extra_channels * self.extra_downscale ** 2

    @property
    def num_input_blocks(self) -> int:
        """Encoder blocks: conv_in, the ResBlocks, and a Downsample after every level but the last."""
        levels = len(self.channel_mult)
        return 1 + levels * self.num_res_blocks + levels - 1

    @property
    def middle_zero_block(self) -> str:
        """Name of the middle port's zero conv in ``zero_blocks``: the last one, after one per encoder
        block (``"12"`` for SD1.5), as in the official network."""
        return str(self.num_input_blocks)

    @property
    def takes_image_hint(self) -> bool:
        """True when a ComfyUI IMAGE can carry the hint: 1 (grey) or 3 (RGB) channels at 8x the
        latent size, plus, for style adapters, the extra map packed by the hint preprocessor."""
        return self.hint_channels in (1, 3) and self.downscale == 8

    def hint_description(self) -> str:
        """The condition this network takes, in words, e.g. "a 1-channel image at 8x the latent size"."""
        where = ("at latent resolution, not pixel-unshuffled" if self.downscale == 1
                 else f"at {self.downscale}x the latent size, pixel-unshuffled by {self.downscale}")
        text = f"a {self.hint_channels}-channel {'image' if self.hint_channels in (1, 3) else 'map'} {where}"
        if self.extra_channels:
            text += (f", plus a {self.extra_channels}-channel extra map pixel-unshuffled by "
                     f"{self.extra_downscale}")
        return text

    def image_hint_problem(self) -> str | None:
        """Why a ComfyUI IMAGE cannot be this network's hint, or None when it can (see
        :attr:`takes_image_hint`); the text says what the adapter expects and how to use it."""
        if self.takes_image_hint:
            return None
        scale = "" if self.downscale == 1 else f"{self.downscale} x "
        return (f"this adapter expects {self.hint_description()} (a tensor of shape (batch, "
                f"{self.hint_channels}, {scale}latent height, {scale}latent width)), which a "
                f"ComfyUI IMAGE (1 grey or 3 RGB channels at the image's size) cannot carry. Apply BPS steers "
                f"with 1-channel (sketch), 3-channel (layout, segmentation) and style (RGB + extra map) "
                f"adapters; use this one from Python with bps.load_adapter (its network takes the "
                f"{self.hint_channels}-channel tensor), or train it with train/train_bps.py")

    @property
    def num_ports(self) -> int:
        """Number of residuals the network returns: encoder ResBlocks, the middle, decoder blocks."""
        levels = len(self.channel_mult)
        return levels * self.num_res_blocks + 1 + levels * (self.num_res_blocks + 1)

    @classmethod
    def for_unet(cls, shape: UNetShape, **hint: Any) -> "BPSConfig":
        """B_phi's config for a UNet of ``shape``: its widths, ResBlock count and time-embedding
        width; ``hint`` sets the condition fields (``hint_channels``, ``extra_channels``...).

        Raises:
            ValueError: the port rule does not cover this UNet (the message says why).
        """
        problem = bps_problem(shape)
        if problem:
            raise ValueError(f"BPS cannot steer {shape.family}: {problem}")
        return cls(model_channels=shape.model_channels, channel_mult=shape.channel_mult,
                   num_res_blocks=shape.num_res_blocks[0], time_embed_dim=shape.time_embed_dim, **hint)

    def fits(self, shape: UNetShape) -> bool:
        """True when this network's residuals match the ports of a UNet of ``shape`` in count,
        width and scale, and it reads that UNet's time embedding."""
        if bps_problem(shape) is not None or self.time_embed_dim != shape.time_embed_dim:
            return False
        ports = port_map(shape)
        return (self.port_channels() == [p.channels for p in ports]
                and self.port_downsample() == [p.downsample for p in ports])

    @property
    def is_sd15_layout(self) -> bool:
        """True when the ports match the SD1.5 UNet (bps.ports.PORTS) in count, width and scale."""
        return self.fits(SD15_SHAPE)

    def shape_without_record(self) -> UNetShape:
        """The UNet shape assumed for an adapter file that records none (files written before
        shapes were recorded, all for the SD1.5 family): SD1.5's block layout at this network's
        widths, which is SD1.5 itself for a full-width network."""
        return UNetShape.like_sd15(self.model_channels, self.channel_mult, self.num_res_blocks, self.time_embed_dim)

    def port_channels(self) -> list[int]:
        """Residual channels per port, in port order."""
        mc, mult, n = self.model_channels, self.channel_mult, self.num_res_blocks
        encoder = [mc * m for m in mult for _ in range(n)]
        decoder = [mc * m for m in reversed(mult) for _ in range(n + 1)]
        return encoder + [mc * mult[-1]] + decoder

    def port_downsample(self) -> list[int]:
        """Latent size / residual size per port, in port order."""
        levels = len(self.channel_mult)
        encoder = [2 ** lvl for lvl in range(levels) for _ in range(self.num_res_blocks)]
        decoder = [2 ** lvl for lvl in reversed(range(levels)) for _ in range(self.num_res_blocks + 1)]
        return encoder + [2 ** (levels - 1)] + decoder

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of the config (round-trips through :meth:`from_dict`)."""
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BPSConfig":
        """Build a config from :meth:`to_dict` output; unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown BPS config keys {unknown}; known keys are {sorted(known)}")
        kwargs = dict(d)
        if "channel_mult" in kwargs:
            kwargs["channel_mult"] = tuple(kwargs["channel_mult"])
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ValueError(f"invalid BPS config {d}: {e}") from None


assert BPSConfig().port_channels() == [p.channels for p in SD15_PORTS]
assert BPSConfig().port_downsample() == [p.downsample for p in SD15_PORTS]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the weights' dtype, as the official network does."""

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels, eps=1e-5)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return SmallMapConv2d(cin, cout, 3, stride=stride, padding=1)


class ResBlock(nn.Module):
    """The LDM ResBlock with scale-shift normalisation of the time embedding."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(cin), nn.SiLU(), _conv3x3(cin, cout))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_layers = nn.Sequential(_norm(cout), nn.SiLU(), nn.Dropout(0.0), _conv3x3(cout, cout))
        self.skip_connection = nn.Identity() if cin == cout else SmallMapConv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        norm, rest = self.out_layers[0], self.out_layers[1:]
        h = rest(norm(h) * (1 + scale) + shift)
        return self.skip_connection(x) + h


class ResZeroBlock(nn.Module):
    """Decoder block: norm, SiLU, zero-initialised conv, plus a (1x1 conv) skip. No time input."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.out_layers = nn.Sequential(_norm(cin), nn.SiLU(), nn.Dropout(0.0), _conv3x3(cin, cout))
        self.skip_connection = nn.Identity() if cin == cout else SmallMapConv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip_connection(x) + self.out_layers(x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv, stored as ``op`` like the LDM Downsample."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = _conv3x3(channels, channels, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 conv, stored as ``conv``.

    Upsamples to the size of the encoder feature it is concatenated with next, like the SD UNet,
    so latents with odd sides (which stride-2 convs round up) line up; for even sides this is
    exactly a x2 upsampling.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class BPSNetwork(nn.Module):
    """B_phi: returns the unweighted residual of every port for a hint and a UNet time embedding.

    Every output path ends in a zero-initialised conv, so a freshly built network returns exact
    zeros and a UNet steered by it is unchanged until training moves the weights.
    """

    def __init__(self, config: BPSConfig = BPSConfig(), *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        #: Trade compute for memory in training: recompute each block in the backward pass.
        self.gradient_checkpointing = False
        mc, emb_dim = config.model_channels, config.time_embed_dim
        levels = len(config.channel_mult)

        self.unshuffle = nn.PixelUnshuffle(config.downscale)
        self.extra_unshuffle = nn.PixelUnshuffle(config.extra_downscale)

        input_blocks: list[nn.Module] = [_conv3x3(config.in_channels, mc)]
        zero_blocks: dict[str, nn.Module] = {}
        skip_channels = [mc]
        ch = mc
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                input_blocks.append(ResBlock(ch, mc * mult, emb_dim))
                ch = mc * mult
                zero_blocks[str(len(input_blocks) - 1)] = _zero(_conv3x3(ch, ch))
                skip_channels.append(ch)
            if level != levels - 1:
                input_blocks.append(Downsample(ch))
                skip_channels.append(ch)
        self.input_blocks = nn.ModuleList(input_blocks)
        # The official zero convs of conv_in and the Downsamples are never used, so they are not
        # built; a ModuleDict keeps the official indices as names.
        self._ported_inputs = tuple(int(k) for k in zero_blocks)
        assert len(input_blocks) == config.num_input_blocks
        # The middle port's zero conv comes last, after one slot per input block (official layout).
        zero_blocks[config.middle_zero_block] = _zero(_conv3x3(ch, ch))
        self.zero_blocks = nn.ModuleDict(zero_blocks)

        self.middle_block = nn.ModuleList([ResBlock(ch, ch, emb_dim), ResBlock(ch, ch, emb_dim)])

        output_blocks = []
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                cin = ch + skip_channels.pop()
                ch = mc * mult
                block = [ResZeroBlock(cin, ch), _zero(_conv3x3(ch, ch))]
                if level and i == config.num_res_blocks:
                    block.append(Upsample(ch))
                output_blocks.append(nn.ModuleList(block))
        self.output_blocks = nn.ModuleList(output_blocks)

        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype the network computes in (that of its weights)."""
        return self.input_blocks[0].weight.dtype

    def prepare_hint(self, hint: Tensor, extra: Tensor | None = None) -> Tensor:
        """Validate the condition image(s) and pixel-unshuffle them to latent resolution.

        Raises:
            HintError: wrong rank, channel count, or a size that is not a multiple of the
                pixel-unshuffle factor.
        """
        cfg = self.config
        if hint.ndim != 4:
            raise HintError(f"BPS hint must be a 4-D tensor (batch, channels, height, width), got shape "
                            f"{tuple(hint.shape)}")
        if extra is None and cfg.extra_channels and hint.shape[1] == cfg.hint_channels + cfg.extra_channels:
            if cfg.extra_downscale != cfg.downscale:
                raise HintError(f"this style adapter unshuffles its extra map by {cfg.extra_downscale}, not "
                                f"{cfg.downscale}; pass the extra map separately as `extra`")
            hint, extra = hint[:, :cfg.hint_channels], hint[:, cfg.hint_channels:]
        if hint.shape[1] != cfg.hint_channels:
            want = f"{cfg.hint_channels}" + (f" (+{cfg.extra_channels} extra)" if cfg.extra_channels else "")
            fix = ("convert the condition image (e.g. to grayscale for 1-channel sketch adapters)"
                   if cfg.hint_channels in (1, 3) else
                   f"pass a {cfg.hint_channels}-channel map at {cfg.downscale}x the latent size")
            raise HintError(f"BPS hint has {hint.shape[1]} channels but this adapter expects {want}; {fix}")
        h, w = hint.shape[-2:]
        if h % cfg.downscale or w % cfg.downscale:
            raise HintError(f"BPS hint is {h}x{w} pixels; its height and width must be multiples of "
                            f"{cfg.downscale} ({cfg.downscale}x the latent size). Resize the condition image "
                            f"to match the latent, e.g. {h // cfg.downscale * cfg.downscale}x"
                            f"{w // cfg.downscale * cfg.downscale}")
        # Contiguous (NCHW) on purpose: ComfyUI's IMAGE is (B, H, W, C), so a hint arrives as a
        # channels-last view; convolutions fed channels-last re-lay their NCHW weights out on every
        # call (a copy of each [1280, 1280, 3, 3] weight) and run the slow kernel, which made B_phi
        # twice as slow. The copy here is of the small unshuffled hint, once per call.
        x = self.unshuffle(hint.to(self.dtype)).contiguous()
        if cfg.extra_channels:
            if extra is None:
                raise HintError(f"this style adapter needs an extra map with {cfg.extra_channels} channel(s) "
                                f"besides the {cfg.hint_channels}-channel image")
            if extra.ndim != 4 or extra.shape[1] != cfg.extra_channels or extra.shape[0] != hint.shape[0]:
                raise HintError(f"BPS extra map must be (batch={hint.shape[0]}, {cfg.extra_channels}, H, W), "
                                f"got {tuple(extra.shape)}")
            want_hw = (h // cfg.downscale * cfg.extra_downscale, w // cfg.downscale * cfg.extra_downscale)
            if tuple(extra.shape[-2:]) != want_hw:
                raise HintError(f"BPS extra map is {tuple(extra.shape[-2:])} pixels; for a {h}x{w} hint it "
                                f"must be {want_hw[0]}x{want_hw[1]}")
            x = torch.cat([x, self.extra_unshuffle(extra.to(self.dtype)).contiguous()], dim=1)
        elif extra is not None:
            raise HintError("this adapter takes no extra map; drop the `extra` argument")
        return x

    def _run(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, hint: Tensor, emb: Tensor, extra: Tensor | None = None) -> list[Tensor]:
        """Compute the unweighted port residuals.

        Args:
            hint: condition image ``(B, C, 8h, 8w)`` in [0, 1].
            emb: the UNet's time embedding ``(B, time_embed_dim)`` for the same rows.
            extra: the style variant's extra map, if not packed into ``hint``.

        Returns:
            ``config.num_ports`` tensors in port order (encoder, middle, decoder), each
            ``(B, channels, h / downsample, w / downsample)``; omega is applied by the caller.
        """
        x = self.prepare_hint(hint, extra)
        if emb.ndim != 2 or emb.shape[0] != x.shape[0] or emb.shape[1] != self.config.time_embed_dim:
            raise HintError(f"time embedding must be (batch={x.shape[0]}, {self.config.time_embed_dim}), got "
                            f"{tuple(emb.shape)}; the hint batch must match the UNet rows it steers")
        emb = emb.to(self.dtype)

        outs: list[Tensor] = []
        skips: list[Tensor] = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = self._run(block, h, emb) if isinstance(block, ResBlock) else self._run(block, h)
            skips.append(h)
            if i in self._ported_inputs:
                outs.append(self.zero_blocks[str(i)](h))

        rb1, rb2 = self.middle_block
        h = self._run(rb1, h, emb)
        h = self._run(rb2, h, emb)
        outs.append(self.zero_blocks[self.config.middle_zero_block](h))

        for block in self.output_blocks:
            h = self._run(block[0], torch.cat([h, skips.pop()], dim=1))
            outs.append(block[1](h))
            if len(block) > 2:
                h = self._run(block[2], h, tuple(skips[-1].shape[-2:]))
        return outs
