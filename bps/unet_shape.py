"""What a Stable-Diffusion-family UNet looks like, as far as BPS cares.

BPS puts a port on UNet blocks and adds residuals after the ResBlocks and SpatialTransformers
inside them, so the one description both the port rule (:mod:`bps.ports`) and B_phi's
architecture (:meth:`bps.network.BPSConfig.for_unet`) need is: the widths per level, the blocks
in order with the kinds of layer each holds, and what the time embedding and text context look
like. :class:`UNetShape` is that description. It is read off a real UNet module
(:meth:`UNetShape.from_module`, duck-typed on class names so this package never imports
ComfyUI) or off ComfyUI's ``unet_config`` dict (:meth:`UNetShape.from_unet_config`), and an
adapter file records the shape it was trained for, so a mismatch is caught before any tensor
meets the wrong UNet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

#: Layer kinds a block can hold, in the order a block lists them. "res" and "attn" receive a
#: port's residual; "conv" (conv_in), "down" and "up" never do.
LAYER_KINDS = ("conv", "res", "attn", "down", "up")
INJECTED_KINDS = ("res", "attn")

# Class names of ComfyUI's (and the original LDM's) UNet layers, by kind. Subclasses such as
# VideoResBlock are matched through the class's MRO.
_KIND_OF_CLASS = {"ResBlock": "res", "SpatialTransformer": "attn", "Downsample": "down", "Upsample": "up"}


def _kind_of(module: Any) -> str:
    for cls in type(module).__mro__:
        kind = _KIND_OF_CLASS.get(cls.__name__)
        if kind is not None:
            return kind
    if type(module).__name__.startswith("Conv"):
        return "conv"
    return type(module).__name__


def _block_layers(block: Any) -> tuple[str, ...]:
    # BPS's own injection markers (nodes/injection.py) sit in blocks of a model that is patched
    # right now; they are not part of the UNet.
    children = [c for c in block.children() if not hasattr(c, "bps_port_index")] if hasattr(block, "children") \
        else []
    return tuple(_kind_of(c) for c in children) if children else (_kind_of(block),)


@dataclass(frozen=True)
class UNetShape:
    """The block structure of an SD-family UNet.

    Attributes:
        model_channels: width of the first level (320 for SD1.5 and SDXL).
        channel_mult: width multiplier per level ((1, 2, 4, 4) for SD1.5, (1, 2, 4) for SDXL).
        num_res_blocks: ResBlocks per encoder level (the decoder has one more per level).
        input_blocks: layer kinds of every input block, e.g. ``("res", "attn")``; conv_in is
            ``("conv",)`` and a Downsample block ``("down",)``.
        middle_block: layer kinds of the middle block; ``()`` for UNets without one.
        output_blocks: layer kinds of every output block, e.g. ``("res", "attn", "up")``.
        time_embed_dim: width of the time embedding the ResBlocks take (4 x model_channels).
        context_dim: width of the text context the transformers attend to (768 SD1.5, 2048 SDXL);
            None when the UNet has no cross-attention.
        adm_in_channels: width of the extra vector added to the time embedding through
            ``label_emb`` (2816 for SDXL: pooled text + size/crop embeddings); None for SD1.5.
        in_channels: latent channels the UNet takes (4; 9 for inpainting models). Not part of
            :meth:`signature`: an inpainting UNet has the hidden states of its base.
    """

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    input_blocks: tuple[tuple[str, ...], ...]
    middle_block: tuple[str, ...]
    output_blocks: tuple[tuple[str, ...], ...]
    time_embed_dim: int
    context_dim: int | None = None
    adm_in_channels: int | None = None
    in_channels: int = 4

    def __post_init__(self) -> None:
        # Normalise lists (JSON, ComfyUI configs) to tuples so shapes compare and hash by value.
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "num_res_blocks", tuple(int(n) for n in self.num_res_blocks))
        object.__setattr__(self, "input_blocks", tuple(tuple(b) for b in self.input_blocks))
        object.__setattr__(self, "middle_block", tuple(self.middle_block))
        object.__setattr__(self, "output_blocks", tuple(tuple(b) for b in self.output_blocks))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_module(cls, unet: Any, *, context_dim: int | None = None,
                    adm_in_channels: int | None = None) -> "UNetShape":
        """Read the shape off a UNet module (ComfyUI's ``UNetModel`` or the original LDM one).

        ``context_dim`` and ``adm_in_channels`` are not kept on ComfyUI's UNet object; pass them
        from ``model_config.unet_config``.
        """
        nrb = unet.num_res_blocks
        mult = tuple(unet.channel_mult)
        middle = getattr(unet, "middle_block", None)
        time_embed = unet.time_embed
        last_linear = [m for m in time_embed.modules() if hasattr(m, "out_features")][-1]
        return cls(
            model_channels=int(unet.model_channels),
            channel_mult=mult,
            num_res_blocks=tuple(nrb) if isinstance(nrb, Sequence) else (int(nrb),) * len(mult),
            input_blocks=tuple(_block_layers(b) for b in unet.input_blocks),
            middle_block=_block_layers(middle) if middle is not None else (),
            output_blocks=tuple(_block_layers(b) for b in unet.output_blocks),
            time_embed_dim=int(last_linear.out_features),
            context_dim=None if context_dim is None else int(context_dim),
            adm_in_channels=None if adm_in_channels is None else int(adm_in_channels),
            in_channels=int(unet.in_channels),
        )

    @classmethod
    def from_unet_config(cls, config: Mapping[str, Any]) -> "UNetShape":
        """The shape ComfyUI's ``UNetModel`` builds from a detected ``unet_config``.

        Expects the per-ResBlock form ComfyUI's model detection produces (``transformer_depth``
        one entry per encoder ResBlock, ``transformer_depth_output`` one per output block, listed from the highest-resolution level
        up as ComfyUI stores it (the UNet pops it from the end),
        ``transformer_depth_middle``: -2 no middle block, -1 a lone ResBlock, >= 0 ResBlock +
        transformer + ResBlock), as in ``model.model.model_config.unet_config``.
        """
        mc = int(config["model_channels"])
        mult = tuple(int(m) for m in config["channel_mult"])
        nrb = config["num_res_blocks"]
        nrb = tuple(int(n) for n in nrb) if isinstance(nrb, Sequence) else (int(nrb),) * len(mult)
        depth_in = list(config.get("transformer_depth", ()))
        depth_out = list(config.get("transformer_depth_output", ()))
        depth_mid = config.get("transformer_depth_middle")
        if depth_mid is None:
            depth_mid = depth_in[-1] if depth_in else -1
        if len(depth_in) != sum(nrb) or len(depth_out) != sum(n + 1 for n in nrb):
            raise ValueError(f"unet_config has {len(depth_in)} encoder / {len(depth_out)} decoder transformer "
                             f"depths for num_res_blocks {list(nrb)}; expected ComfyUI's detected per-ResBlock "
                             f"form")
        inputs: list[tuple[str, ...]] = [("conv",)]
        k = 0
        for level in range(len(mult)):
            for _ in range(nrb[level]):
                inputs.append(("res", "attn") if depth_in[k] > 0 else ("res",))
                k += 1
            if level != len(mult) - 1:
                inputs.append(("down",))
        outputs: list[tuple[str, ...]] = []
        depth_out = depth_out[::-1]  # ComfyUI lists it by level, lowest first, and pops from the end
        k = 0
        for level in reversed(range(len(mult))):
            for i in range(nrb[level] + 1):
                block = ("res", "attn") if depth_out[k] > 0 else ("res",)
                outputs.append(block + (("up",) if level and i == nrb[level] else ()))
                k += 1
        middle = () if depth_mid < -1 else ("res",) if depth_mid == -1 else ("res", "attn", "res")
        return cls(mc, mult, nrb, tuple(inputs), middle, tuple(outputs),
                   time_embed_dim=int(config.get("time_embed_dim") or 4 * mc),
                   context_dim=config.get("context_dim"), adm_in_channels=config.get("adm_in_channels"),
                   in_channels=int(config.get("in_channels", 4)))

    @classmethod
    def like_sd15(cls, model_channels: int = 320, channel_mult: Sequence[int] = (1, 2, 4, 4),
                  num_res_blocks: int = 2, time_embed_dim: int | None = None,
                  context_dim: int | None = 768) -> "UNetShape":
        """SD1.5's block layout at other widths: transformers on every level but the deepest, a
        ResBlock + transformer + ResBlock middle. ``like_sd15()`` is SD1.5 itself; the mini base
        and adapter files from before shapes were recorded are other instances."""
        levels = len(channel_mult)
        depth_in = [1 if level < levels - 1 else 0 for level in range(levels) for _ in range(num_res_blocks)]
        depth_out = [1 if level < levels - 1 else 0 for level in range(levels) for _ in range(num_res_blocks + 1)]
        return cls.from_unet_config({
            "model_channels": model_channels, "channel_mult": tuple(channel_mult),
            "num_res_blocks": num_res_blocks, "transformer_depth": depth_in, "transformer_depth_output": depth_out,
            "transformer_depth_middle": 1, "context_dim": context_dim,
            "time_embed_dim": time_embed_dim or 4 * model_channels})

    # ------------------------------------------------------------------ identity

    def signature(self) -> "UNetShape":
        """The shape with what an adapter does not care about normalised away (``in_channels``):
        two UNets with equal signatures take the same adapters."""
        return UNetShape(**{**asdict(self), "in_channels": 4})

    def same_family(self, other: "UNetShape") -> bool:
        """True when an adapter trained on ``other`` steers a UNet of this shape.

        Compared as plain values: the trainer imports this package under another name than
        ComfyUI's node loader does, and a shape from one copy must match the other's.
        """
        return asdict(self.signature()) == asdict(other.signature())

    def _layout(self) -> tuple:
        # Blocks and levels only: the widths (model_channels and each level's channel_mult) are
        # what a family's smaller instances (test UNets, the mini base) change.
        return (len(self.channel_mult), self.num_res_blocks, self.input_blocks, self.middle_block, self.output_blocks)

    def _layout_family(self) -> str | None:
        """The known family whose block layout this shape has, at whatever widths."""
        matches = [name for name, known in KNOWN_FAMILIES.items() if self._layout() == known._layout()]
        same_context = [name for name in matches if KNOWN_FAMILIES[name].context_dim == self.context_dim]
        return (same_context or matches or [None])[0]

    @property
    def family(self) -> str:
        """A short name: ``"SD1.5"``, ``"SD2.x"``, ``"SDXL"``; for other widths the layout it
        shares (``"SD1.5-layout UNet at model_channels 32"``, with its ``channel_mult`` where that
        differs from the family's), else its widths."""
        sig = self.signature()
        for name, known in KNOWN_FAMILIES.items():
            if sig == known.signature():
                return name
        layout = self._layout_family()
        if layout:
            mult = "" if self.channel_mult == KNOWN_FAMILIES[layout].channel_mult else \
                f", channel_mult {list(self.channel_mult)}"
            return f"{layout}-layout UNet at model_channels {self.model_channels}{mult}"
        return f"a UNet with model_channels {self.model_channels}, channel_mult {list(self.channel_mult)}"

    @property
    def family_key(self) -> str:
        """The ``base_model`` word adapter files record: ``"sd15"``, ``"sdxl"``, ``"sd2"`` for those
        families' layouts at any width, else ``"custom"``."""
        sig = self.signature()
        for name, known in KNOWN_FAMILIES.items():
            if sig == known.signature():
                return _FAMILY_KEYS[name]
        return _FAMILY_KEYS.get(self._layout_family() or "", "custom")

    def describe(self) -> str:
        """One line naming the family and the structure, for error messages."""
        levels = ", ".join(f"{self.model_channels * m}" for m in self.channel_mult)
        mid = "+".join(self.middle_block) if self.middle_block else "none"
        ctx = f", text context {self.context_dim}" if self.context_dim else ""
        adm = f", adm {self.adm_in_channels}" if self.adm_in_channels else ""
        return (f"{self.family} (levels {levels} ch, {list(self.num_res_blocks)} ResBlocks per level, "
                f"{len(self.input_blocks)} input / {len(self.output_blocks)} output blocks, middle {mid}"
                f"{ctx}{adm})")

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (round-trips through :meth:`from_dict`)."""
        d = asdict(self)
        for key in ("channel_mult", "num_res_blocks", "middle_block"):
            d[key] = list(d[key])
        d["input_blocks"] = [list(b) for b in self.input_blocks]
        d["output_blocks"] = [list(b) for b in self.output_blocks]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetShape":
        """Build a shape from :meth:`to_dict` output; unknown or missing keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNet shape keys {unknown}; known keys are {sorted(known)}")
        try:
            shape = cls(**d)
        except TypeError as e:
            raise ValueError(f"invalid UNet shape {dict(d)}: {e}") from None
        bad = {k for block in (*shape.input_blocks, shape.middle_block, *shape.output_blocks) for k in block
               if k not in LAYER_KINDS}
        if bad:
            raise ValueError(f"invalid UNet shape: unknown layer kinds {sorted(bad)}")
        return shape


#: Stable Diffusion 1.5: the 21-port UNet of the paper.
SD15_SHAPE = UNetShape.like_sd15()
#: SDXL base (and its fine-tunes: Illustrious, Pony, NoobAI, ...), as ComfyUI's SDXL config builds it.
SDXL_SHAPE = UNetShape.from_unet_config({
    "model_channels": 320, "channel_mult": (1, 2, 4), "num_res_blocks": 2,
    "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10, "context_dim": 2048, "adm_in_channels": 2816})
#: Families named in messages, by the shape their UNet has.
KNOWN_FAMILIES: dict[str, UNetShape] = {
    "SD1.5": SD15_SHAPE,
    "SD2.x": UNetShape(**{**asdict(SD15_SHAPE), "context_dim": 1024}),
    "SDXL": SDXL_SHAPE,
}
_FAMILY_KEYS = {"SD1.5": "sd15", "SD2.x": "sd2", "SDXL": "sdxl"}
