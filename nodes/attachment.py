"""One adapter applied to one model: the per-UNet-call computation of its weighted residuals.

A :class:`BPSAttachment` holds the network, its omega schedule, hint and mask. Its
DIFFUSION_MODEL wrapper (:class:`SteeringWrapper`) computes the residuals once per UNet call,
once per distinct (timestep, hint row), so the CFG cond and uncond halves share them, skips
B_phi entirely when all weights are 0, and hands the residuals to the injection markers in a
shallow copy of ``transformer_options`` before calling the executor, so other wrappers still run.
"""

from __future__ import annotations

import dataclasses
import uuid
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

import comfy.patcher_extension
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

from ..bps.errors import HintError
from ..bps.network import BPSNetwork
from ..bps.ports import PortMap, port_map
from ..bps.residual_cache import ResidualCache, residual_key, tensor_digest
from ..bps.schedule import OmegaSchedule, progress_from_timestep
from ..bps.unet_shape import UNetShape
from .hint_fit import as_mask, batch_index, fit_image, prepare_hint_channels, row_layout
from .injection import RESIDUALS_KEY

#: Prefix of the wrapper / additional-model keys; each attachment appends a unique suffix.
WRAPPER_KEY_PREFIX = "bps_steering"


@dataclass(eq=False)
class BPSAttachment:
    """One adapter applied to one model: everything the wrapper needs to compute its residuals.

    ``hint``/``extra`` may be replaced between UNet calls with :meth:`set_hint` (the trainer sets a
    new hint per batch); ``mask`` likewise by assignment.
    """

    network: BPSNetwork
    schedule: OmegaSchedule
    #: The UNet the adapter was trained for (``adapter.unet_shape``); None: the SD1.5-layout UNet
    #: of the network's widths (adapters that record no shape).
    unet_shape: UNetShape | None = None
    hint: Tensor | None = None          # (B, C, H, W) in [0, 1], any size: fitted to 8x the latent per call
    mask: Tensor | None = None          # (H, W) or (B, H, W) in [0, 1]; resized to every port
    extra: Tensor | None = None         # style variant's extra map, if not packed into hint
    share_rows: bool = True             # compute B_phi once per distinct (timestep, hint row)
    #: Scales the residual on the uncond (negative) CFG rows, after B_phi and its cache; 1.0 is the
    #: paper's rule (both halves steered alike), 0 steers only the cond rows.
    uncond_multiplier: float = 1.0
    #: Keep B_phi's outputs across UNet calls and sampling runs (the nodes' process-wide cache); None
    #: computes every call. Used only without gradients and with the network in eval mode.
    residual_cache: ResidualCache | None = None
    key: str = field(default_factory=lambda: f"{WRAPPER_KEY_PREFIX}_{uuid.uuid4().hex[:12]}")
    #: The adapter file the network was read from, if any: the MultiGPU deep clone re-reads it.
    source: str | None = None
    _fitted: dict = field(default_factory=dict, repr=False)
    #: (what, batch, latent batch) already logged by batch_index: one line per case, not per step.
    _told: set = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.unet_shape is None:
            self.unet_shape = self.network.config.shape_without_record()
        self.mask = as_mask(self.mask)
        if self.hint is not None:
            self.set_hint(self.hint, self.extra)

    def with_network(self, network: BPSNetwork) -> "BPSAttachment":
        """This attachment (same key, schedule, hint, mask) computing with another copy of B_phi,
        e.g. the one a MultiGPU deep clone loaded on its own device."""
        return dataclasses.replace(self, network=network, _fitted={}, _told=set())

    @property
    def ports(self) -> PortMap:
        """The ports of the UNet this attachment steers, in the network's output order."""
        return port_map(self.unet_shape)

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

        Rows map to hint rows like ComfyUI's ControlNet does (:func:`.hint_fit.batch_index`), by
        the window's frame indices under context windows; B_phi runs once per distinct
        (timestep, hint row) among the rows with a non-zero weight (``share_rows``), or once per
        active row. Gradients flow into the network unless the caller disabled them.
        """
        rows = x.shape[0]
        t_rows = timesteps.detach().reshape(-1).float().cpu()
        if t_rows.numel() == 1:
            t_rows = t_rows.expand(rows)
        per_t = {v: self.schedule.weights_at(progress_from_timestep(v)) for v in set(t_rows.tolist())}
        weights = torch.tensor([per_t[v] for v in t_rows.tolist()], dtype=torch.float64)  # rows x ports
        layout = row_layout(rows, transformer_options)
        if self.uncond_multiplier != 1.0:
            weights[layout.uncond] *= self.uncond_multiplier
        active = weights.ne(0).any(dim=1)
        if not bool(active.any()):
            return None
        if self.hint is None:
            raise HintError("the BPS adapter has no condition image: connect an image to Apply BPS")

        # Hint rows follow the latent samples (under context windows, the window's frames), so the
        # B_phi inputs, and the residual cache keys made from them, are those of the rows used.
        hint_rows = batch_index(layout, self.hint.shape[0], "condition image", self._told)
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
            mask = self.mask[batch_index(layout, self.mask.shape[0], "mask", self._told)].to(x.device, x.dtype)
        mask_at: dict[tuple[int, int], Tensor] = {}
        result: dict[int, Tensor] = {}
        for port, out in zip(self.ports, outs):
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


class SteeringWrapper:
    """DIFFUSION_MODEL wrapper of one attachment: compute its residuals, then run the UNet."""

    def __init__(self, attachment: BPSAttachment):
        self.attachment = attachment
        #: The wrapper of each MultiGPU clone of a steered model, by the clone's device: it computes
        #: with that clone's own B_phi copy. Weak: it lives as long as the clone that holds it.
        self._device_wrappers: dict[torch.device, weakref.ref] = {}

    def on_multigpu_clone(self, original, clone) -> None:
        """ON_DEEPCLONE_MULTIGPU and ON_MATCH_MULTIGPU_CLONES callback: the clone for another device
        holds its own B_phi (its additional model under this attachment's key, rebuilt by the
        patcher's factory for the deep clone and handed on to every re-matched clone); the clone's
        wrapper computes with that copy, not with the original on the original's device, and is the
        one :meth:`to` hands core for that device."""
        key = self.attachment.key
        copies = clone.additional_models.get(key) or []
        if not copies:
            return
        wrappers = clone.wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
        if key in wrappers:
            mine = SteeringWrapper(self.attachment.with_network(copies[0].model))
            wrappers[key] = [mine if isinstance(w, SteeringWrapper) else w for w in wrappers[key]]
            self._device_wrappers[clone.load_device] = weakref.ref(mine)

    def to(self, target) -> "SteeringWrapper":
        """The wrapper for ``target``: core's MultiGPU sampling runs every device with the main
        model's wrappers and asks each for its device's version (``cast_transformer_options``
        calls ``.to(device)``, and ``.to(dtype)``, on every wrapper before a device computes its
        rows). A device with a MultiGPU clone of this model gets the clone's wrapper (its own
        B_phi); any other target, this wrapper."""
        if isinstance(target, torch.device):
            ref = self._device_wrappers.get(target)
            mine = ref() if ref is not None else None
            if mine is not None:
                return mine
        return self

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

