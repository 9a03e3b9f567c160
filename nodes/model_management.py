"""B_phi as a ComfyUI-managed model: its ModelPatcher, dtype copies, and the process-wide residual cache.

The adapter network is an additional model of every steered clone, so ComfyUI loads it to the
GPU with the UNet, offloads it with it, and counts it in its memory estimates.
"""

from __future__ import annotations

import weakref

import torch

import comfy.model_management
import comfy.model_patcher

from . import comfy_compat
from ..bps.adapter_file import load_adapter
from ..bps.network import BPSNetwork
from ..bps.residual_cache import ResidualCache, budget_from_env

#: network -> weak reference to its ModelPatcher. Values are weak so that the registry never keeps
#: a network alive: the patcher lives as long as some steered model lists it as additional model.
_ADAPTER_PATCHERS: "weakref.WeakKeyDictionary[BPSNetwork, weakref.ref]" = weakref.WeakKeyDictionary()
#: network -> {dtype: weak reference to a cast copy}, for UNets computing in another dtype.
_CAST_COPIES: "weakref.WeakKeyDictionary[BPSNetwork, dict]" = weakref.WeakKeyDictionary()


def adapter_model_patcher(network: BPSNetwork, source: str | None = None) -> comfy.model_patcher.ModelPatcher:
    """The ComfyUI-managed ModelPatcher of an adapter network (one per network, shared by all applies).

    Built as current core loaders build theirs: with the core patcher class (dynamic VRAM where
    ComfyUI turned it on) and a ``cached_patcher_init`` factory that rebuilds it, with its own copy
    of B_phi, from the adapter file ``source`` in the network's dtype (or, for a network that came
    from no file, from its weights), which core's MultiGPU deep clone and non-dynamic delegates call.
    """
    ref = _ADAPTER_PATCHERS.get(network)
    patcher = ref() if ref is not None else None
    if patcher is None:
        patcher = _new_patcher(network, comfy_compat.core_patcher_class())
        comfy_compat.set_patcher_factory(patcher, rebuild_adapter_patcher, (source or network, network.dtype))
        _ADAPTER_PATCHERS[network] = weakref.ref(patcher)
    return patcher


#: id(owner) -> the patcher :func:`patcher_owned_by` keeps alive for as long as the owner lives.
_OWNED_PATCHERS: dict[int, comfy.model_patcher.ModelPatcher] = {}


def patcher_owned_by(owner: object, network: BPSNetwork, source: str | None = None) -> comfy.model_patcher.ModelPatcher:
    """:func:`adapter_model_patcher` of ``network``, kept alive for as long as ``owner`` (the loaded
    adapter that holds ``network``) lives.

    ComfyUI's executor keeps a Load BPS Adapter output (the adapter, and so its network) across
    prompts while every new Apply BPS output replaces the steered model that held the patcher. A
    patcher that dies while its network lives is what core's model management reports as a memory
    leak: it warns, keeps counting the dead entry as loaded memory, and the next prompt loads a
    second patcher of the same weights, unloading other models to make room for it.
    """
    patcher = adapter_model_patcher(network, source)
    key = id(owner)
    if key not in _OWNED_PATCHERS:
        weakref.finalize(owner, _OWNED_PATCHERS.pop, key, None)
    _OWNED_PATCHERS[key] = patcher
    return patcher


def _new_patcher(network: BPSNetwork, patcher_class: type) -> comfy.model_patcher.ModelPatcher:
    return patcher_class(network, load_device=comfy.model_management.get_torch_device(),
                         offload_device=comfy.model_management.unet_offload_device())


def rebuild_adapter_patcher(source: str | BPSNetwork, dtype: torch.dtype,
                            disable_dynamic: bool = False) -> comfy.model_patcher.ModelPatcher:
    """A new adapter patcher owning a new B_phi: read from the adapter file ``source`` (a path) or
    copied from the network ``source``, in ``dtype``; the ``cached_patcher_init`` factory of
    :func:`adapter_model_patcher`. ``disable_dynamic``: a plain ModelPatcher, as core asks for a
    non-dynamic delegate."""
    if isinstance(source, BPSNetwork):
        with torch.device("meta"):
            network = BPSNetwork(source.config)
        network.load_state_dict({k: v.detach().to(dtype, copy=True) for k, v in source.state_dict().items()},
                                assign=True)
        network.eval().requires_grad_(False)
    else:
        network = load_adapter(source, dtype=dtype).network
    patcher = _new_patcher(network, comfy.model_patcher.ModelPatcher if disable_dynamic
                           else comfy_compat.core_patcher_class())
    comfy_compat.set_patcher_factory(patcher, rebuild_adapter_patcher, (source, dtype))
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

_RESIDUAL_CACHE: ResidualCache | None = None


def residual_cache() -> ResidualCache:
    """The process-wide residual cache of the nodes (made on first use; budget from
    ``BPS_RESIDUAL_CACHE_MB``, default 1024 MiB, 0 disables). Entries live on ComfyUI's offload
    device, so between runs they hold no GPU memory."""
    global _RESIDUAL_CACHE
    if _RESIDUAL_CACHE is None:
        _RESIDUAL_CACHE = ResidualCache(budget_from_env(), storage_device=comfy.model_management.unet_offload_device())
    return _RESIDUAL_CACHE

