"""Attach a BPS adapter to a ComfyUI MODEL: the one place where B_phi meets the UNet.

The ``BPSApply`` node and the trainer both go through :func:`attach` (``attach_bps`` is its
node-facing form), so sampling and training inject residuals identically. Everything happens on a
``model.clone()`` through ComfyUI's public extension points; nothing global is patched:

* **object patches** replace each of the 21 ported UNet blocks by a ``TimestepEmbedSequential``
  that holds the *same* child modules under their original names ("0", "1", ...) plus
  parameter-free :class:`BPSInjectionPoint` markers ("bps_after_0", ...) after every ResBlock and
  SpatialTransformer. Weight keys are unchanged, so LoRA and other weight patches still land, and
  ModelPatcher puts the original blocks back when it unpatches the model;
* a **forward_timestep_embed patch** is called by the UNet for each marker and adds, for every
  attached adapter, ``omega_i(t) * mask * residual_i`` to the hidden state. It is registered once
  per model lineage, however many BPSApply nodes are chained;
* one **DIFFUSION_MODEL wrapper** per attached adapter computes that adapter's residuals once per
  UNet call, once per distinct (timestep, hint row), so the CFG cond and uncond halves share them,
  and skips B_phi entirely when all weights are 0. It hands the residuals to the markers in a
  shallow copy of ``transformer_options`` and calls the executor, so other wrappers still run;
* the adapter network is an **additional model** of the clone, so ComfyUI loads it to the GPU
  with the UNet, offloads it with it, and counts it in its memory estimates.

Training entry points: :func:`steered_unet_forward` (one call) and :class:`SteeredForward`
(reusable runner); both keep gradients flowing into the adapter network.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, TimestepEmbedSequential, UNetModel
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

from ..bps.errors import HintError
from ..bps.network import BPSNetwork
from ..bps.ports import PORTS
from ..bps.residual_cache import ResidualCache, budget_from_env, residual_key, tensor_digest
from ..bps.schedule import OmegaSchedule, make_schedule, progress_from_timestep

log = logging.getLogger("comfyui-bps")

#: transformer_options key under which the wrappers hand this UNet call's residuals to the markers:
#: a tuple with one ``{port index: weighted residual}`` dict per active attachment.
RESIDUALS_KEY = "bps_residuals"
#: Prefix of the wrapper / additional-model keys; each attachment appends a unique suffix.
WRAPPER_KEY_PREFIX = "bps_steering"
#: RGB -> luminance weights (ITU-R BT.601, as cv2.COLOR_RGB2GRAY, which the trainer uses).
LUMA = (0.299, 0.587, 0.114)

#: What an SD1.5 UNet looks like (ComfyUI's unet_config values).
SD15_SHAPE = {"model_channels": 320, "channel_mult": (1, 2, 4, 4), "context_dim": 768}
#: UNet input channels BPS can steer: SD1.5 (4) and the SD1.5 inpainting model (9), whose hidden
#: states, time embedding and text context are those of SD1.5.
SD15_IN_CHANNELS = (4, 9)
_EXPECTED = ("BPS adapters steer Stable Diffusion 1.5: a UNet with model_channels 320, channel_mult "
             "(1, 2, 4, 4), one transformer per attention block and a 768-wide (CLIP-L) text context")


class BPSInjectionPoint(nn.Module):
    """Parameter-free marker after a ResBlock/SpatialTransformer where port ``port_index`` adds its residual.

    The forward_timestep_embed patch does the adding; called directly, the marker is the identity,
    so a marker without its patch cannot change the result.
    """

    def __init__(self, port_index: int):
        super().__init__()
        #: Read by the patch handler. A plain attribute so another copy of this pack (trainer and
        #: nodes imported under different package names) recognises these markers too.
        self.bps_port_index = port_index

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"port={PORTS[self.bps_port_index].name}"


def _fit_to(residual: Tensor, x: Tensor, port_index: int) -> Tensor:
    """The residual at the hidden state's size; only the spatial size may differ (rounding at odd sizes)."""
    if residual.shape == x.shape:
        return residual
    if residual.shape[:2] != x.shape[:2] or residual.ndim != x.ndim:
        raise HintError(f"BPS residual for port {PORTS[port_index].name} is {tuple(residual.shape)} but the UNet "
                        f"hidden state there is {tuple(x.shape)}: this UNet is not laid out like SD1.5")
    return F.interpolate(residual, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _inject(layer: BPSInjectionPoint, x: Tensor, emb, context, transformer_options: dict, *args) -> Tensor:
    """forward_timestep_embed patch: add every active attachment's residual for this marker's port."""
    port = layer.bps_port_index
    for residuals in transformer_options.get(RESIDUALS_KEY, ()):
        r = residuals.get(port)
        if r is not None:
            x = x + _fit_to(r, x, port)
    return x


_INJECT_PATCH = (BPSInjectionPoint, _inject)


# ----------------------------------------------------------------------------- base model check

def describe_model(model: comfy.model_patcher.ModelPatcher) -> str:
    """Short human name of a MODEL's family, e.g. ``"SD15"``, ``"SDXL"``, ``"Flux"``."""
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__


def check_sd15(model: comfy.model_patcher.ModelPatcher, adapter_name: str | None = None) -> None:
    """Raise a ValueError naming the model family and the expectation unless ``model`` is SD1.5-shaped.

    SD2.x shares SD1.5's block layout but has a 1024-wide text context and other weights; adapters
    are trained against SD1.5 (adapter files record ``base_model: sd15``), so SD2.x is refused too.
    """
    what = describe_model(model)
    who = f"the adapter {adapter_name!r}" if adapter_name else "the adapter"
    fix = f"{_EXPECTED}; {who} expects that. Connect an SD1.5 checkpoint's MODEL (e.g. v1-5-pruned-emaonly)."
    unet = getattr(model.model, "diffusion_model", None)
    if not isinstance(unet, UNetModel):
        raise ValueError(f"BPS cannot steer this MODEL: it is {what} (a {type(unet).__name__}, not a UNet). {fix}")
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    found = {"model_channels": unet.model_channels, "channel_mult": tuple(unet.channel_mult),
             "context_dim": unet_config.get("context_dim")}
    wrong = [f"{k} {found[k]} (SD1.5: {v})" for k, v in SD15_SHAPE.items() if found[k] != v]
    if unet.in_channels not in SD15_IN_CHANNELS:
        wrong.append(f"in_channels {unet.in_channels} (SD1.5: 4, inpainting: 9)")
    if len(unet.input_blocks) != 12 or len(unet.output_blocks) != 12:
        wrong.append(f"{len(unet.input_blocks)} input / {len(unet.output_blocks)} output blocks (SD1.5: 12 / 12)")
    if wrong:
        family = " (SD2.x: same block layout, but another text encoder and weights)" if found["context_dim"] == 1024 \
            else ""
        raise ValueError(f"BPS cannot steer this MODEL: it is {what}{family}, not SD1.5-shaped: "
                         f"{'; '.join(wrong)}. {fix}")


# ----------------------------------------------------------------------------- injection points

def _injected_block(block: nn.Module, port_index: int) -> TimestepEmbedSequential:
    """The block's own children under their own names, plus a marker after each ResBlock/SpatialTransformer."""
    children: OrderedDict[str, nn.Module] = OrderedDict()
    for name, child in block.named_children():
        children[name] = child
        if isinstance(child, (ResBlock, SpatialTransformer)):
            children[f"bps_after_{name}"] = BPSInjectionPoint(port_index)
    return TimestepEmbedSequential(children)


def _has_markers(module: Any) -> bool:
    return isinstance(module, nn.Module) and any(hasattr(m, "bps_port_index") for m in module.children())


def _install_injection_points(model: comfy.model_patcher.ModelPatcher) -> None:
    """Object-patch the 21 ported blocks and register the marker patch, once per model lineage.

    Idempotent: a model that already carries BPS blocks (an earlier BPSApply in the chain) keeps
    them and its handler, and later attachments only add their own wrapper.
    """
    keys = [f"diffusion_model.{port.module_path}" for port in PORTS]
    if all(_has_markers(model.object_patches.get(k)) for k in keys):
        return
    for port, key in zip(PORTS, keys):
        # get_model_object honours object patches other extensions put on this block.
        patched = _injected_block(model.get_model_object(key), port.index)
        markers = sum(isinstance(m, BPSInjectionPoint) for m in patched.children())
        if markers != port.sublayers:
            raise ValueError(f"BPS cannot steer this MODEL: UNet block {port.module_path} has {markers} ResBlock/"
                             f"SpatialTransformer layers where SD1.5 has {port.sublayers}. {_EXPECTED}.")
        model.add_object_patch(key, patched)
    model.set_model_forward_timestep_embed_patch(_INJECT_PATCH)


# ----------------------------------------------------------------------------- hints and masks

def prepare_hint_channels(hint: Tensor, channels: int, extra_channels: int = 0) -> Tensor:
    """Match a ``(B, C, H, W)`` image in [0, 1] to the adapter's channel layout.

    RGB becomes one channel by luminance for 1-channel adapters; one channel is repeated for
    3-channel adapters; an alpha channel is dropped. An image that already has
    ``channels + extra_channels`` channels (a style adapter's RGB plus extra map, packed) is kept.

    Raises:
        HintError: the image is not 4-D or its channels cannot be matched.
    """
    if hint.ndim != 4:
        raise HintError(f"the condition image must be (batch, channels, height, width), got {tuple(hint.shape)}")
    c = hint.shape[1]
    if c == channels or (extra_channels and c == channels + extra_channels):
        return hint
    if extra_channels:
        raise HintError(f"this style adapter takes {channels} image channel(s) plus {extra_channels} extra map "
                        f"channel(s) packed together ({channels + extra_channels} in all), got {c}. Build the "
                        f"hint with the BPS Hint Preprocessor node and its extra_map input")
    if c == 4:
        hint, c = hint[:, :3], 3
    if c == 3 and channels == 1:
        weights = torch.tensor(LUMA, dtype=hint.dtype, device=hint.device).view(1, 3, 1, 1)
        return (hint * weights).sum(dim=1, keepdim=True)
    if c == 1 and channels == 3:
        return hint.expand(-1, 3, -1, -1)
    if c == 3 and channels == 3:
        return hint
    raise HintError(f"the condition image has {c} channels; this adapter takes {channels}. Use a grayscale or RGB "
                    f"image")


def fit_image(image: Tensor, height: int, width: int) -> Tensor:
    """Centre-crop ``(B, C, H, W)`` to the aspect ratio of ``height x width`` and resize to it.

    Like ComfyUI's ControlNet hint handling (``common_upscale(..., "center")``); the filter is the
    trainer's: area averaging when shrinking (thin strokes stay visible), bicubic when enlarging.
    """
    if tuple(image.shape[-2:]) == (height, width):
        return image
    shrink = image.shape[-2] >= height and image.shape[-1] >= width
    out = comfy.utils.common_upscale(image, width, height, "area" if shrink else "bicubic", "center")
    return out if shrink else out.clamp(0.0, 1.0)


def _row_samples(rows: int, transformer_options: dict) -> Tensor:
    """Latent sample index of every row of a UNet call.

    ComfyUI batches [cond chunk, uncond chunk, ...], each chunk one full latent batch, and lists the
    chunks in ``cond_or_uncond`` (as ControlNet's broadcast_image_to assumes).
    """
    chunks = len(transformer_options.get("cond_or_uncond", ()) or ()) or 1
    if rows % chunks:
        chunks = 1
    return torch.arange(rows) % (rows // chunks)


def _batch_index(samples: Tensor, available: int, what: str) -> Tensor:
    """Which row of a hint/mask batch each sample uses: a batch of 1 is broadcast, else one per sample."""
    if available == 1:
        return torch.zeros_like(samples)
    latent_batch = int(samples.max()) + 1
    if available != latent_batch:
        raise HintError(f"the {what} has a batch of {available} but the latent batch is {latent_batch}: give one "
                        f"{what} for all samples or exactly one per sample (e.g. match the Empty Latent Image "
                        f"batch_size)")
    return samples


def _as_mask(mask: Tensor | None) -> Tensor | None:
    """A MASK as ``(B, 1, H, W)`` float in [0, 1]."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise HintError(f"the mask must be (height, width) or (batch, height, width), got {tuple(mask.shape)}")
    return mask.float().clamp(0.0, 1.0).unsqueeze(1)


# ----------------------------------------------------------------------------- attachment

@dataclass(eq=False)
class BPSAttachment:
    """One adapter applied to one model: everything the wrapper needs to compute its residuals.

    ``hint``/``extra`` may be replaced between UNet calls with :meth:`set_hint` (the trainer sets a
    new hint per batch); ``mask`` likewise by assignment.
    """

    network: BPSNetwork
    schedule: OmegaSchedule
    hint: Tensor | None = None          # (B, C, H, W) in [0, 1], any size: fitted to 8x the latent per call
    mask: Tensor | None = None          # (H, W) or (B, H, W) in [0, 1]; resized to every port
    extra: Tensor | None = None         # style variant's extra map, if not packed into hint
    share_rows: bool = True             # compute B_phi once per distinct (timestep, hint row)
    #: Keep B_phi's outputs across UNet calls and sampling runs (the nodes' process-wide cache); None
    #: computes every call. Used only without gradients and with the network in eval mode.
    residual_cache: ResidualCache | None = None
    key: str = field(default_factory=lambda: f"{WRAPPER_KEY_PREFIX}_{uuid.uuid4().hex[:12]}")
    _fitted: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.mask = _as_mask(self.mask)
        if self.hint is not None:
            self.set_hint(self.hint, self.extra)

    def set_hint(self, hint: Tensor, extra: Tensor | None = None) -> None:
        """Replace the condition image (and the style variant's extra map)."""
        cfg = self.network.config
        self.hint = prepare_hint_channels(hint, cfg.hint_channels, cfg.extra_channels if extra is None else 0)
        self.extra = extra
        self._fitted = {}

    def _hint_at(self, height: int, width: int, device: torch.device, dtype: torch.dtype
                 ) -> tuple[Tensor, Tensor | None]:
        """Hint (and extra map) fitted to a ``height x width`` latent, cached for the last size."""
        return self._fitted_at(height, width, device, dtype)[:2]

    def _row_digests(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> list[str]:
        """Content digest of every fitted hint row (with its extra map row), for the residual cache."""
        key = (height, width, device, dtype)
        hint, extra, digests = self._fitted_at(height, width, device, dtype)
        if digests is None:
            digests = [tensor_digest(hint[i]) + (tensor_digest(extra[i]) if extra is not None else "")
                       for i in range(hint.shape[0])]
            self._fitted[key] = (hint, extra, digests)
        return digests

    def _fitted_at(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> tuple:
        key = (height, width, device, dtype)
        if key not in self._fitted:
            cfg = self.network.config
            hint = fit_image(self.hint.float(), height * cfg.downscale, width * cfg.downscale)
            extra = None
            if self.extra is not None:
                extra = fit_image(self.extra.float(), height * cfg.extra_downscale, width * cfg.extra_downscale)
                extra = extra.to(device, dtype)
            # No .contiguous() here: BPSNetwork.prepare_hint lays its input out NCHW for every caller.
            self._fitted = {key: (hint.to(device, dtype), extra, None)}
        return self._fitted[key]

    def residuals(self, unet: UNetModel, x: Tensor, timesteps: Tensor, transformer_options: dict
                  ) -> dict[int, Tensor] | None:
        """Weighted, masked residual per port for one UNet call, or None when every weight is 0.

        Rows map to hint rows like ComfyUI's ControlNet does; B_phi runs once per distinct
        (timestep, hint row) among the rows with a non-zero weight (``share_rows``), or once per
        active row. Gradients flow into the network unless the caller disabled them.
        """
        rows = x.shape[0]
        t_rows = timesteps.detach().reshape(-1).float().cpu()
        if t_rows.numel() == 1:
            t_rows = t_rows.expand(rows)
        per_t = {v: self.schedule.weights_at(progress_from_timestep(v)) for v in set(t_rows.tolist())}
        weights = torch.tensor([per_t[v] for v in t_rows.tolist()], dtype=torch.float64)  # rows x ports
        active = weights.ne(0).any(dim=1)
        if not bool(active.any()):
            return None
        if self.hint is None:
            raise HintError("the BPS adapter has no condition image: connect an image to Apply BPS")

        samples = _row_samples(rows, transformer_options)
        hint_rows = _batch_index(samples, self.hint.shape[0], "condition image")
        # One B_phi input per distinct (timestep, hint row) of the active rows: CFG halves share it.
        slot_of: dict[tuple, int] = {}
        row_slot = torch.zeros(rows, dtype=torch.long)
        for r in range(rows):
            if not active[r]:
                continue  # weight 0 everywhere: any slot will do, the residual is multiplied by 0
            key = (float(t_rows[r]), int(hint_rows[r])) if self.share_rows else (r,)
            row_slot[r] = slot_of.setdefault(key, len(slot_of))
        slot_rows = torch.tensor([next(r for r in range(rows) if active[r] and row_slot[r] == s)
                                  for s in range(len(slot_of))])

        net = self.network
        net_device, net_dtype = next(net.parameters()).device, net.dtype
        hint, extra = self._hint_at(x.shape[-2], x.shape[-1], net_device, net_dtype)
        pick = hint_rows[slot_rows].to(net_device)
        with torch.no_grad():  # emb does not depend on B_phi: no graph through the frozen UNet's time MLP
            t_emb = timestep_embedding(t_rows[slot_rows].to(x.device), unet.model_channels,
                                       repeat_only=False).to(x.dtype)
            emb = unet.time_embed(t_emb).to(net_device, net_dtype)
        outs = None
        cache = self.residual_cache
        # Never with gradients (training needs the graph) nor in train mode (weights about to change).
        cache_key = None
        if cache is not None and cache.enabled and not torch.is_grad_enabled() and not net.training:
            digests = self._row_digests(x.shape[-2], x.shape[-1], net_device, net_dtype)
            cache_key = residual_key(net, [digests[i] for i in pick.tolist()], emb, x.shape[-2:], net_device,
                                     net_dtype)
            outs = cache.get(cache_key, net_device)
        if outs is None:
            outs = net(hint[pick], emb, extra[pick] if extra is not None else None)
            if cache_key is not None:
                cache.put(cache_key, outs)

        row_slot = row_slot.to(x.device)
        mask = None
        if self.mask is not None:
            mask = self.mask[_batch_index(samples, self.mask.shape[0], "mask")].to(x.device, x.dtype)
        mask_at: dict[tuple[int, int], Tensor] = {}
        result: dict[int, Tensor] = {}
        for port, out in zip(PORTS, outs):
            w = weights[:, port.index]
            if not bool(w.ne(0).any()):
                continue
            r = out.to(x.device, x.dtype)[row_slot] * w.to(x.device, x.dtype).view(-1, 1, 1, 1)
            if mask is not None:
                size = tuple(r.shape[-2:])
                if size not in mask_at:
                    mask_at[size] = F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
                r = r * mask_at[size]
            result[port.index] = r
        return result


class _SteeringWrapper:
    """DIFFUSION_MODEL wrapper of one attachment: compute its residuals, then run the UNet."""

    def __init__(self, attachment: BPSAttachment):
        self.attachment = attachment

    def __call__(self, executor, x, timesteps, *args, **kwargs):
        # UNetModel.forward hands the executor (x, timesteps, context, y, control, transformer_options).
        args = list(args)
        positional = "transformer_options" not in kwargs and len(args) > 3
        options = args[3] if positional else kwargs.get("transformer_options", {})
        residuals = self.attachment.residuals(executor.class_obj, x, timesteps, options)
        if residuals is not None:
            options = {**options, RESIDUALS_KEY: tuple(options.get(RESIDUALS_KEY, ())) + (residuals,)}
            if positional:
                args[3] = options
            else:
                kwargs["transformer_options"] = options
        return executor(x, timesteps, *args, **kwargs)


# ----------------------------------------------------------------------------- ComfyUI model management

#: network -> weak reference to its ModelPatcher. Values are weak so that the registry never keeps
#: a network alive: the patcher lives as long as some steered model lists it as additional model.
_ADAPTER_PATCHERS: "weakref.WeakKeyDictionary[BPSNetwork, weakref.ref]" = weakref.WeakKeyDictionary()
#: network -> {dtype: weak reference to a cast copy}, for UNets computing in another dtype.
_CAST_COPIES: "weakref.WeakKeyDictionary[BPSNetwork, dict]" = weakref.WeakKeyDictionary()


def adapter_model_patcher(network: BPSNetwork) -> comfy.model_patcher.ModelPatcher:
    """The ComfyUI-managed ModelPatcher of an adapter network (one per network, shared by all applies)."""
    ref = _ADAPTER_PATCHERS.get(network)
    patcher = ref() if ref is not None else None
    if patcher is None:
        patcher = comfy.model_patcher.ModelPatcher(network, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        _ADAPTER_PATCHERS[network] = weakref.ref(patcher)
    return patcher


def unet_compute_dtype(model: comfy.model_patcher.ModelPatcher) -> torch.dtype:
    """The dtype the MODEL's UNet computes in (its manual-cast dtype if any, else its weight dtype)."""
    return model.get_model_object("manual_cast_dtype") or model.model.get_dtype()


def network_in_dtype(network: BPSNetwork, dtype: torch.dtype) -> BPSNetwork:
    """``network`` itself if it computes in ``dtype``, else a cached cast copy (same device, no gradients)."""
    if network.dtype == dtype:
        return network
    copies = _CAST_COPIES.setdefault(network, {})
    ref = copies.get(dtype)
    copy = ref() if ref is not None else None
    if copy is None:
        with torch.device("meta"):
            copy = BPSNetwork(network.config)
        copy.load_state_dict({k: v.to(dtype) for k, v in network.state_dict().items()}, assign=True)
        copy.eval().requires_grad_(False)
        copies[dtype] = weakref.ref(copy)
    return copy


def attach(model: comfy.model_patcher.ModelPatcher, attachment: BPSAttachment, *,
           manage_network: bool = True, adapter_name: str | None = None) -> comfy.model_patcher.ModelPatcher:
    """Return a clone of ``model`` steered by ``attachment``; stacks with earlier attachments.

    Args:
        model: an SD1.5 MODEL; it is not modified.
        attachment: network, schedule, hint and mask of this adapter.
        manage_network: register the network as an additional model, so ComfyUI loads and offloads
            it with the UNet (the node path). The trainer passes False and keeps the network on its
            own device, under its own optimiser.
        adapter_name: named in error messages.

    Raises:
        ValueError: ``model`` is not SD1.5-shaped, or the adapter is not laid out for SD1.5.
    """
    check_sd15(model, adapter_name)
    if not attachment.network.config.is_sd15_layout:
        raise ValueError(f"the BPS adapter {adapter_name or ''} is not laid out for SD1.5 (its network has "
                         f"model_channels {attachment.network.config.model_channels}, channel_mult "
                         f"{attachment.network.config.channel_mult}); {_EXPECTED}, and the adapter must match it")
    steered = model.clone()
    _install_injection_points(steered)
    steered.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, attachment.key,
                                 _SteeringWrapper(attachment))
    if manage_network:
        steered.set_additional_models(attachment.key, [adapter_model_patcher(attachment.network)])
    return steered


_RESIDUAL_CACHE: ResidualCache | None = None


def residual_cache() -> ResidualCache:
    """The process-wide residual cache of the nodes (made on first use; budget from
    ``BPS_RESIDUAL_CACHE_MB``, default 1024 MiB, 0 disables). Entries live on ComfyUI's offload
    device, so between runs they hold no GPU memory."""
    global _RESIDUAL_CACHE
    if _RESIDUAL_CACHE is None:
        _RESIDUAL_CACHE = ResidualCache(budget_from_env(), storage_device=comfy.model_management.unet_offload_device())
    return _RESIDUAL_CACHE


def attach_bps(model: comfy.model_patcher.ModelPatcher, adapter: Any, hint: Tensor, schedule: OmegaSchedule,
               mask: Tensor | None = None, *, share_rows: bool = True,
               cache: ResidualCache | None | str = "process") -> comfy.model_patcher.ModelPatcher:
    """Steer ``model`` with a loaded adapter (:class:`bps.Adapter`); returns a patched clone.

    This is what the Apply BPS node runs. The adapter computes in the UNet's compute dtype (a cast
    copy is made once if its weights are in another dtype).

    Args:
        model: an SD1.5 ComfyUI MODEL (ModelPatcher); it is not modified.
        adapter: the loaded adapter; its ``network`` computes the residuals.
        hint: condition image(s) ``(B, C, H, W)`` in [0, 1], any size (centre-cropped and resized to
            8x the latent at sampling time); batch 1, or one per latent sample.
        schedule: port weights over sampling progress (:func:`bps.make_schedule`).
        mask: optional ``(H, W)`` or ``(B, H, W)`` in [0, 1]: where steering acts; resized to each port.
        share_rows: compute B_phi once per distinct (timestep, hint row) (CFG sharing); False
            computes every row (tests compare the two).
        cache: where B_phi's outputs are kept across UNet calls and runs: ``"process"`` (default) the
            process-wide :func:`residual_cache`, a :class:`ResidualCache` of the caller's, or None to
            compute every call. Weights (strength, omega, range) and the mask are applied after it.

    Raises:
        ValueError: not an SD1.5 MODEL. HintError: the image's channels cannot be matched.
    """
    network = network_in_dtype(adapter.network, unet_compute_dtype(model))
    attachment = BPSAttachment(network, schedule, hint=hint, mask=mask, share_rows=share_rows,
                               residual_cache=residual_cache() if cache == "process" else cache)
    name = getattr(adapter, "path", None)
    return attach(model, attachment, adapter_name=str(name).replace("\\", "/").rsplit("/", 1)[-1] if name else None)


# ----------------------------------------------------------------------------- training

def transformer_options_for(model: comfy.model_patcher.ModelPatcher) -> dict:
    """transformer_options as ComfyUI's sampler builds them: the MODEL's options plus its wrappers."""
    options = comfy.patcher_extension.copy_nested_dicts(model.model_options["transformer_options"])
    comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), model.wrappers, copy_dict1=False)
    return options


def steered_unet_forward(model: comfy.model_patcher.ModelPatcher, x: Tensor, timesteps: Tensor, context: Tensor,
                         *, cond_or_uncond: Sequence[int] | None = None, **unet_kwargs: Any) -> Tensor:
    """Run the UNet of a steered MODEL (from :func:`attach`) on raw UNet inputs, with gradients.

    The same path as sampling: the MODEL's transformer_options and DIFFUSION_MODEL wrappers, the
    object-patched blocks and the marker patch. Call ``comfy.model_management.load_models_gpu([model])``
    first so the patches are applied. Not wrapped in ``no_grad``: gradients reach the adapter
    network (the UNet's own weights get none if the caller froze them).

    Args:
        model: a MODEL returned by :func:`attach` / :func:`attach_bps`.
        x: UNet input ``(N, 4, h, w)`` (noisy latent, already scaled as the UNet expects).
        timesteps: ``(N,)`` UNet timesteps in [0, 999].
        context: text conditioning ``(N, 77, 768)``.
        cond_or_uncond: chunk layout of the rows (ComfyUI's ``[0, 1]`` for cond+uncond); None = one chunk.
        unet_kwargs: passed to the UNet (``control``, ``y``...).

    Returns:
        The UNet output (eps prediction for SD1.5).
    """
    options = transformer_options_for(model)
    if cond_or_uncond is not None:
        options["cond_or_uncond"] = list(cond_or_uncond)
    return model.model.diffusion_model(x, timesteps, context=context, transformer_options=options, **unet_kwargs)


class SteeredForward:
    """Reusable differentiable steered-UNet forward for training, through :func:`attach`.

    The network stays under the caller's control (device, dtype, DDP, optimiser): it is not made
    a ComfyUI-managed model; ComfyUI only loads the frozen UNet.

    Example::

        runner = SteeredForward(base_model, network, omega)
        eps = runner(hint, x_t, timesteps, context)   # differentiable w.r.t. network
    """

    def __init__(self, model: comfy.model_patcher.ModelPatcher, network: BPSNetwork, omega: Sequence[float]):
        self.attachment = BPSAttachment(network, make_schedule([float(w) for w in omega]))
        self.model = attach(model, self.attachment, manage_network=False)

    def __call__(self, hint: Tensor, x: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        """eps for UNet input ``x``, timesteps in [0, 999], text context and hint ``(B, C, H, W)`` in [0, 1]."""
        comfy.model_management.load_models_gpu([self.model])
        self.attachment.set_hint(hint)
        return steered_unet_forward(self.model, x, timestep, context)
