"""Attach a BPS adapter to a ComfyUI MODEL: the one place where B_phi meets the UNet.

Both the ``BPSApply`` node and the trainer go through :func:`attach_bps`, so sampling and
training inject residuals identically. Everything happens on a ``model.clone()`` through
ComfyUI's public extension points:

* **object patches** replace each ported UNet block by a ``TimestepEmbedSequential`` holding the
  *same* child modules under their original names, with parameter-free
  :class:`BPSInjectionPoint` markers after every ResBlock and SpatialTransformer. Weight keys are
  unchanged (LoRA and weight patches still land), and ModelPatcher restores the original blocks
  when the patched model is unloaded;
* a **forward_timestep_embed patch** is called by the UNet for each marker and adds, for every
  attached adapter, ``omega_i(t) * mask * residual_i`` to the hidden state;
* a **DIFFUSION_MODEL wrapper** computes the residuals once per UNet call, once per distinct
  (timestep, hint) row, so the CFG cond and uncond halves share them, and skips B_phi entirely
  when all weights are zero;
* the adapter network is an **additional model**, so ComfyUI loads, offloads and budgets it
  with the UNet.
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
from ..bps.schedule import OmegaSchedule, progress_from_timestep

log = logging.getLogger("comfyui-bps")

#: transformer_options key under which the wrapper hands this call's residuals to the markers.
RESIDUALS_KEY = "bps_residuals"
WRAPPER_KEY_PREFIX = "bps_steering"
LUMA = (0.299, 0.587, 0.114)


class BPSInjectionPoint(nn.Module):
    """Marker after a ResBlock/SpatialTransformer where a port's residual is added.

    It has no parameters. Without the patch (which ComfyUI always installs alongside it), it
    passes the hidden state through unchanged.
    """

    def __init__(self, port_index: int):
        super().__init__()
        self.port_index = port_index

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"port={PORTS[self.port_index].name}"


def _inject(layer: BPSInjectionPoint, x: Tensor, emb, context, transformer_options, *args) -> Tensor:
    """forward_timestep_embed patch: add every attached adapter's residual for this port."""
    for residuals in transformer_options.get(RESIDUALS_KEY, ()):
        r = residuals.get(layer.port_index)
        if r is None:
            continue
        if r.shape != x.shape:
            raise HintError(f"BPS residual for port {PORTS[layer.port_index].name} is {tuple(r.shape)} but the "
                            f"UNet hidden state is {tuple(x.shape)}; this UNet is not laid out like SD1.5")
        x = x + r
    return x


_INJECT_PATCH = (BPSInjectionPoint, _inject)


def _describe_model(model: comfy.model_patcher.ModelPatcher) -> str:
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__


def check_sd15(model: comfy.model_patcher.ModelPatcher) -> None:
    """Raise a ValueError naming the model family unless ``model`` is an SD1.5-shaped UNet."""
    what = _describe_model(model)
    unet = getattr(model.model, "diffusion_model", None)
    expect = ("BPS adapters steer Stable Diffusion 1.5 (UNet with model_channels 320, channel_mult "
              "(1, 2, 4, 4), 768-wide text context); load an SD1.5 checkpoint")
    if not isinstance(unet, UNetModel):
        raise ValueError(f"this MODEL is {what} ({type(unet).__name__}), not an SD1.5 UNet. {expect}.")
    cfg = getattr(model.model, "model_config", None)
    unet_config = getattr(cfg, "unet_config", {}) or {}
    found = (unet.model_channels, tuple(unet.channel_mult), unet_config.get("context_dim"), unet.in_channels)
    if found != (320, (1, 2, 4, 4), 768, 4) or len(unet.input_blocks) != 12 or len(unet.output_blocks) != 12:
        raise ValueError(f"this MODEL is {what} (model_channels {found[0]}, channel_mult {found[1]}, context_dim "
                         f"{found[2]}, in_channels {found[3]}), not SD1.5-shaped. {expect}.")


def _injected_block(block: nn.Module, port_index: int) -> TimestepEmbedSequential:
    """The block with a marker after each ResBlock and SpatialTransformer; children keep their names."""
    children: OrderedDict[str, nn.Module] = OrderedDict()
    for name, child in block.named_children():
        children[name] = child
        if isinstance(child, (ResBlock, SpatialTransformer)):
            children[f"bps_after_{name}"] = BPSInjectionPoint(port_index)
    return TimestepEmbedSequential(children)


def _install_injection_points(model: comfy.model_patcher.ModelPatcher) -> None:
    """Object-patch the ported blocks and register the marker patch, once per model lineage."""
    patches = model.model_options["transformer_options"].get("patches", {})
    if _INJECT_PATCH in patches.get("forward_timestep_embed_patch", []):
        return
    unet = model.model.diffusion_model
    for port in PORTS:
        block = unet.get_submodule(port.module_path)
        patched = _injected_block(block, port.index)
        markers = sum(isinstance(m, BPSInjectionPoint) for m in patched.children())
        if markers != port.sublayers:
            raise ValueError(f"UNet block {port.module_path} has {markers} ResBlock/SpatialTransformer layers where "
                             f"SD1.5 has {port.sublayers}; this MODEL is not SD1.5-shaped")
        model.add_object_patch(f"diffusion_model.{port.module_path}", patched)
    model.set_model_forward_timestep_embed_patch(_INJECT_PATCH)


def prepare_hint_channels(hint: Tensor, channels: int) -> Tensor:
    """Match a (B, C, H, W) image in [0, 1] to the adapter's channel count.

    RGB(A) becomes one channel by luminance for 1-channel adapters; one channel is repeated for
    3-channel adapters; alpha is dropped.
    """
    if hint.ndim != 4:
        raise HintError(f"condition image must be (batch, channels, height, width), got {tuple(hint.shape)}")
    c = hint.shape[1]
    if c == 4:
        hint, c = hint[:, :3], 3
    if c == channels:
        return hint
    if c == 3 and channels == 1:
        weights = torch.tensor(LUMA, dtype=hint.dtype, device=hint.device).view(1, 3, 1, 1)
        return (hint * weights).sum(dim=1, keepdim=True)
    if c == 1 and channels in (3, 4):
        return hint.expand(-1, channels, -1, -1)
    raise HintError(f"condition image has {c} channels; this adapter takes {channels}. Use a grayscale or RGB image")


def _rows_to_samples(rows: int, transformer_options: dict) -> Tensor:
    """Sample index (within one cond/uncond chunk) of every row of a UNet call."""
    chunks = len(transformer_options.get("cond_or_uncond", ())) or 1
    if rows % chunks:
        chunks = 1
    return torch.arange(rows) % (rows // chunks)


def _batch_index(samples: Tensor, available: int, what: str) -> Tensor:
    """Which row of a hint/mask batch each sample uses: broadcast a batch of 1, else match 1:1."""
    if available == 1:
        return torch.zeros_like(samples)
    latent_batch = int(samples.max()) + 1
    if available != latent_batch:
        raise HintError(f"the {what} has a batch of {available} but the latent batch is {latent_batch}; give one "
                        f"{what} for all samples or exactly one per sample")
    return samples


@dataclass(eq=False)
class BPSAttachment:
    """One adapter applied to a model: what the wrapper needs to compute its residuals.

    ``hint`` and ``mask`` may be replaced between calls (the trainer sets a new hint per batch).
    """

    network: BPSNetwork
    schedule: OmegaSchedule
    hint: Tensor | None = None          # (B, C, H, W) in [0, 1], any size: resized per call
    mask: Tensor | None = None          # (B, H, W) in [0, 1]
    extra: Tensor | None = None         # style variant's extra map, resized like the hint
    share_rows: bool = True             # compute once per distinct (timestep, hint row)
    key: str = field(default_factory=lambda: f"{WRAPPER_KEY_PREFIX}_{uuid.uuid4().hex[:12]}")
    _resized: dict = field(default_factory=dict, repr=False)

    def set_hint(self, hint: Tensor, extra: Tensor | None = None) -> None:
        """Replace the condition image (clears the per-size cache)."""
        self.hint = prepare_hint_channels(hint, self.network.config.hint_channels)
        self.extra = extra
        self._resized.clear()

    def _fit(self, image: Tensor, height: int, width: int, mode: str) -> Tensor:
        # Centre-crop to the aspect ratio, then resize, like ComfyUI's ControlNet.
        return comfy.utils.common_upscale(image, width, height, mode, "center")

    def _hint_at(self, height: int, width: int, device, dtype) -> tuple[Tensor, Tensor | None]:
        key = (height, width, device, dtype)
        if key not in self._resized:
            scale = self.network.config.downscale
            hint = self._fit(self.hint, height * scale, width * scale, "nearest-exact")
            extra = None
            if self.extra is not None:
                es = self.network.config.extra_downscale
                extra = self._fit(self.extra, height * es, width * es, "nearest-exact").to(device, dtype)
            self._resized = {key: (hint.to(device, dtype), extra)}
        return self._resized[key]

    def residuals(self, unet: UNetModel, x: Tensor, timesteps: Tensor, transformer_options: dict
                  ) -> dict[int, Tensor] | None:
        """Weighted, masked residual per port for this UNet call, or None when all weights are 0."""
        rows = x.shape[0]
        t = timesteps.reshape(-1).float().cpu()
        if t.numel() == 1:
            t = t.expand(rows)
        weights = torch.tensor([self.schedule.weights_at(progress_from_timestep(v)) for v in t.tolist()])
        if not torch.any(weights != 0):
            return None
        if self.hint is None:
            raise HintError("no condition image was given to the BPS adapter")

        net = self.network
        device, dtype = next(net.parameters()).device, net.dtype
        samples = _rows_to_samples(rows, transformer_options)
        hint_rows = _batch_index(samples, self.hint.shape[0], "condition image")
        if self.share_rows:
            keys = torch.stack([t, hint_rows.double().float()], dim=1)
            unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
            t_unique, hint_unique = unique[:, 0], unique[:, 1].long()
        else:
            inverse = torch.arange(rows)
            t_unique, hint_unique = t, hint_rows

        hint, extra = self._hint_at(x.shape[-2], x.shape[-1], device, dtype)
        t_emb = timestep_embedding(t_unique.to(x.device), unet.model_channels, repeat_only=False).to(x.dtype)
        emb = unet.time_embed(t_emb).to(device, dtype)
        outs = net(hint[hint_unique.to(device)], emb,
                   extra[hint_unique.to(device)] if extra is not None else None)

        inverse = inverse.to(x.device)
        weights = weights.to(x.device, x.dtype)
        mask = None
        if self.mask is not None:
            mask_rows = _batch_index(samples, self.mask.shape[0], "mask").to(self.mask.device)
            mask = self.mask[mask_rows].unsqueeze(1).to(x.device, x.dtype)
        result: dict[int, Tensor] = {}
        for port, out in zip(PORTS, outs):
            w = weights[:, port.index]
            if not torch.any(w != 0):
                continue
            r = out.to(x.device, x.dtype)[inverse] * w.view(-1, 1, 1, 1)
            if mask is not None:
                r = r * F.interpolate(mask, size=r.shape[-2:], mode="bilinear", align_corners=False)
            result[port.index] = r
        return result


class _SteeringWrapper:
    """DIFFUSION_MODEL wrapper: compute this attachment's residuals, then run the UNet."""

    def __init__(self, attachment: BPSAttachment):
        self.attachment = attachment

    def __call__(self, executor, x, timesteps, *args, **kwargs):
        args = list(args)
        if "transformer_options" in kwargs:
            options = kwargs["transformer_options"]
        else:  # positional: (context, y, control, transformer_options)
            options = args[3] if len(args) > 3 else {}
        residuals = self.attachment.residuals(executor.class_obj, x, timesteps, options)
        if residuals is not None:
            options = {**options, RESIDUALS_KEY: tuple(options.get(RESIDUALS_KEY, ())) + (residuals,)}
            if "transformer_options" in kwargs or len(args) <= 3:
                kwargs["transformer_options"] = options
            else:
                args[3] = options
        return executor(x, timesteps, *args, **kwargs)


_ADAPTER_PATCHERS: "weakref.WeakKeyDictionary[BPSNetwork, comfy.model_patcher.ModelPatcher]" = \
    weakref.WeakKeyDictionary()


def adapter_model_patcher(network: BPSNetwork) -> comfy.model_patcher.ModelPatcher:
    """The ComfyUI-managed wrapper of an adapter network (one per network, shared by all applies)."""
    patcher = _ADAPTER_PATCHERS.get(network)
    if patcher is None:
        patcher = comfy.model_patcher.ModelPatcher(network, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        _ADAPTER_PATCHERS[network] = patcher
    return patcher


def attach(model: comfy.model_patcher.ModelPatcher, attachment: BPSAttachment, *,
           manage_network: bool = True) -> comfy.model_patcher.ModelPatcher:
    """Return a clone of ``model`` steered by ``attachment`` (stacks with earlier attachments)."""
    check_sd15(model)
    if not attachment.network.config.is_sd15_layout:
        raise ValueError("this BPS adapter's network is not laid out for SD1.5 (model_channels 320, channel_mult "
                         "(1, 2, 4, 4), 1280-wide time embedding); it cannot steer an SD1.5 UNet")
    steered = model.clone()
    _install_injection_points(steered)
    steered.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, attachment.key,
                                 _SteeringWrapper(attachment))
    if manage_network:
        steered.set_additional_models(attachment.key, [adapter_model_patcher(attachment.network)])
    return steered


def attach_bps(model: comfy.model_patcher.ModelPatcher, adapter: Any, hint: Tensor, schedule: OmegaSchedule,
               mask: Tensor | None = None, *, share_rows: bool = True) -> comfy.model_patcher.ModelPatcher:
    """Steer ``model`` with a loaded adapter (:class:`bps.Adapter`); returns a patched clone.

    Args:
        model: an SD1.5 ComfyUI MODEL (ModelPatcher); it is not modified.
        adapter: the loaded adapter; its ``network`` computes the residuals.
        hint: condition image(s) ``(B, C, H, W)`` in [0, 1], any size (centre-cropped and resized to
            8x the latent at sampling time); batch 1 or one per latent sample.
        schedule: port weights over sampling progress (:func:`bps.make_schedule`).
        mask: optional ``(B, H, W)`` in [0, 1]: where steering acts; resized to each port.
        share_rows: compute B_phi once per distinct (timestep, hint) row (CFG sharing).
    """
    attachment = BPSAttachment(adapter.network, schedule, mask=mask, share_rows=share_rows)
    attachment.set_hint(hint)
    unet_dtype = model.model.manual_cast_dtype or model.model.get_dtype()
    if adapter.network.dtype != unet_dtype:
        log.info("BPS adapter weights are %s, the UNet computes in %s; the adapter runs in its own dtype",
                 adapter.network.dtype, unet_dtype)
    return attach(model, attachment)


def transformer_options_for(model: comfy.model_patcher.ModelPatcher) -> dict:
    """transformer_options as ComfyUI's sampler builds them: the model's options plus its wrappers."""
    options = comfy.patcher_extension.copy_nested_dicts(model.model_options["transformer_options"])
    comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), model.wrappers, copy_dict1=False)
    return options


class SteeredForward:
    """Differentiable steered UNet forward for training, through the same attachment path.

    The network stays under the caller's control (device, dtype, DDP, optimiser); ComfyUI only
    loads the frozen UNet.
    """

    def __init__(self, model: comfy.model_patcher.ModelPatcher, network: BPSNetwork, omega: Sequence[float]):
        from ..bps.schedule import make_schedule
        self.attachment = BPSAttachment(network, make_schedule(list(omega)))
        self.model = attach(model, self.attachment, manage_network=False)
        self._options = transformer_options_for(self.model)

    def __call__(self, hint: Tensor, x: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        """eps for UNet input ``x``, timesteps 0..999, text context and hint (B, C, H, W) in [0, 1]."""
        comfy.model_management.load_models_gpu([self.model])
        self.attachment.set_hint(hint)
        unet = self.model.model.diffusion_model
        return unet(x, timestep, context=context, transformer_options=dict(self._options))


_RUNNERS: dict[tuple[int, int], SteeredForward] = {}


def run_steered_unet(model: comfy.model_patcher.ModelPatcher, network: BPSNetwork, omega: Sequence[float],
                     hint: Tensor, x: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
    """Steered UNet forward with gradients into ``network`` (the trainer's entry point)."""
    key = (id(model), id(network))
    runner = _RUNNERS.get(key)
    if runner is None or runner.attachment.network is not network or runner.attachment.schedule.base != tuple(
            float(w) for w in omega):
        runner = _RUNNERS[key] = SteeredForward(model, network, omega)
    return runner(hint, x, timestep, context)
