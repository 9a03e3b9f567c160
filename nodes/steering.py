"""Attach a BPS adapter to a ComfyUI MODEL: the one place where B_phi meets the UNet.

The ``BPSApply`` node and the trainer both go through :func:`attach` (``attach_bps`` is its
node-facing form), so sampling and training inject residuals identically. Everything happens on a
``model.clone()`` through ComfyUI's public extension points; nothing global is patched. The jobs
are split by module:

* :mod:`.base_check`: the MODEL's UNet shape, and the refusal of an adapter trained for another;
* :mod:`.injection`: **object patches** replace each ported UNet block by one that holds the same
  children plus parameter-free markers after every ResBlock and SpatialTransformer, and a
  **forward_timestep_embed patch** adds the residuals there (registered once per model lineage,
  however many BPSApply nodes are chained);
* :mod:`.attachment`: one **DIFFUSION_MODEL wrapper** per attached adapter computes its weighted
  residuals once per UNet call (shared by the CFG halves; skipped when all weights are 0);
* :mod:`.hint_fit`: condition images and masks fitted to the latent's size, channels and rows;
* :mod:`.model_management`: the adapter network as an **additional model** of the clone, so
  ComfyUI loads and offloads it with the UNet; dtype copies; the residual cache.

Training entry points: :func:`steered_unet_forward` (one call) and :class:`SteeredForward`
(reusable runner); both keep gradients flowing into the adapter network.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from torch import Tensor

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension

from ..bps.network import BPSNetwork
from ..bps.ports import port_map
from ..bps.residual_cache import ResidualCache
from ..bps.schedule import OmegaSchedule, make_schedule
from ..bps.unet_shape import UNetShape
from . import comfy_compat
from .attachment import WRAPPER_KEY_PREFIX, BPSAttachment, SteeringWrapper
from .base_check import check_model_fits, describe_model, model_unet_shape
from .hint_fit import LUMA, fit_image, prepare_hint_channels
from .injection import RESIDUALS_KEY, BPSInjectionPoint, install_injection_points
from .model_management import (adapter_model_patcher, network_in_dtype, patcher_owned_by, residual_cache,
                               unet_compute_dtype)

__all__ = [
    "BPSAttachment", "BPSInjectionPoint", "LUMA", "RESIDUALS_KEY", "SteeredForward", "WRAPPER_KEY_PREFIX",
    "adapter_model_patcher", "attach", "attach_bps", "check_model_fits", "describe_model", "fit_image",
    "model_unet_shape", "network_in_dtype", "prepare_hint_channels", "residual_cache", "steered_unet_forward",
    "transformer_options_for", "unet_compute_dtype",
]


def attach(model: comfy.model_patcher.ModelPatcher, attachment: BPSAttachment, *,
           manage_network: bool = True, adapter_name: str | None = None) -> comfy.model_patcher.ModelPatcher:
    """Return a clone of ``model`` steered by ``attachment``; stacks with earlier attachments.

    Args:
        model: a MODEL whose UNet is the one the adapter was trained for; it is not modified.
        attachment: network, schedule, hint and mask of this adapter.
        manage_network: register the network as an additional model, so ComfyUI loads and offloads
            it with the UNet (the node path). The trainer passes False and keeps the network on its
            own device, under its own optimiser.
        adapter_name: named in error messages.

    Raises:
        ValueError: ``model`` is not a UNet the adapter was trained for (the message names both).
    """
    check_model_fits(model, attachment.unet_shape, adapter_name)
    if not attachment.network.config.fits(attachment.unet_shape):
        cfg = attachment.network.config
        raise ValueError(f"the BPS network (model_channels {cfg.model_channels}, channel_mult {list(cfg.channel_mult)}, "
                         f"time embedding {cfg.time_embed_dim}) does not fit {attachment.unet_shape.describe()}; "
                         f"build it with BPSConfig.for_unet(shape)")
    steered = model.clone()
    install_injection_points(steered, attachment.ports)
    wrapper = SteeringWrapper(attachment)
    steered.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, attachment.key, wrapper)
    if manage_network:
        steered.set_additional_models(attachment.key, [adapter_model_patcher(attachment.network, attachment.source)])
        comfy_compat.on_multigpu_clone(steered, attachment.key, wrapper.on_multigpu_clone)
    return steered


def attach_bps(model: comfy.model_patcher.ModelPatcher, adapter: Any, hint: Tensor, schedule: OmegaSchedule,
               mask: Tensor | None = None, *, share_rows: bool = True,
               cache: ResidualCache | None | str = "process",
               uncond_multiplier: float = 1.0) -> comfy.model_patcher.ModelPatcher:
    """Steer ``model`` with a loaded adapter (:class:`bps.Adapter`); returns a patched clone.

    This is what the Apply BPS node runs. The adapter computes in the UNet's compute dtype (a cast
    copy is made once if its weights are in another dtype).

    Args:
        model: a ComfyUI MODEL (ModelPatcher) of the UNet the adapter was trained for; it is not modified.
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
        uncond_multiplier: scales the residual on the uncond (negative) CFG rows, after the cache
            (1.0: both halves steered alike, the paper's rule).

    Raises:
        ValueError: not the adapter's UNet. HintError: the image's channels cannot be matched.
    """
    network = network_in_dtype(adapter.network, unet_compute_dtype(model))
    attachment = BPSAttachment(network, schedule, unet_shape=getattr(adapter, "unet_shape", None), hint=hint,
                               mask=mask, share_rows=share_rows, uncond_multiplier=float(uncond_multiplier),
                               source=_file_source(adapter, network),
                               residual_cache=residual_cache() if cache == "process" else cache)
    if network is adapter.network:  # a cast copy lives and dies with the steered models instead
        patcher_owned_by(adapter, network, attachment.source)
    name = getattr(adapter, "path", None)
    return attach(model, attachment, adapter_name=str(name).replace("\\", "/").rsplit("/", 1)[-1] if name else None)



def _file_source(adapter: Any, network: BPSNetwork) -> str | None:
    """The adapter file to rebuild ``network`` from: the adapter's file when ``network`` holds its
    weights as read (itself or a dtype copy of it); None for adapters built in memory."""
    path = getattr(adapter, "path", None)
    return str(path) if path and os.path.isfile(path) else None


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
        context: text conditioning ``(N, 77, context_dim)``.
        cond_or_uncond: chunk layout of the rows (ComfyUI's ``[0, 1]`` for cond+uncond); None = one chunk.
        unet_kwargs: passed to the UNet (``control``, ``y`` for SDXL's pooled/size embedding...).

    Returns:
        The UNet output (the model's prediction: eps, or v for v-prediction models).
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

    def __init__(self, model: comfy.model_patcher.ModelPatcher, network: BPSNetwork, omega: Sequence[float],
                 unet_shape: UNetShape | None = None):
        """``unet_shape``: the UNet ``network`` was built for (default: ``model``'s own)."""
        shape = unet_shape or model_unet_shape(model)
        self.attachment = BPSAttachment(network, make_schedule([float(w) for w in omega], ports=port_map(shape)),
                                        unet_shape=shape)
        self.model = attach(model, self.attachment, manage_network=False)

    def __call__(self, hint: Tensor, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None = None
                 ) -> Tensor:
        """The UNet's prediction for UNet input ``x``, timesteps in [0, 999], text context, hint
        ``(B, C, H, W)`` in [0, 1] and, for UNets that take it (SDXL), ``y`` (pooled text + size)."""
        comfy.model_management.load_models_gpu([self.model])
        self.attachment.set_hint(hint)
        extra = {"y": y} if y is not None else {}
        return steered_unet_forward(self.model, x, timestep, context, **extra)
