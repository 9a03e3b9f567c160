"""Where residuals enter the UNet: parameter-free markers after every ResBlock and transformer of
the ported blocks, and the ``forward_timestep_embed`` patch that adds the residuals at them.

Each ported block is object-patched (on a ModelPatcher clone) by a ``TimestepEmbedSequential``
holding the *same* child modules under their original names plus :class:`BPSInjectionPoint`
markers ("bps_after_0", ...), so weight keys are unchanged (LoRAs still land) and ModelPatcher
puts the original blocks back when it unpatches. The UNet calls the patch for each marker; the
patch adds every active attachment's residual for the marker's port, found in
``transformer_options[RESIDUALS_KEY]``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

import comfy.model_patcher
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, TimestepEmbedSequential

from ..bps.errors import HintError
from ..bps.ports import Port, PortMap

#: transformer_options key under which the wrappers hand this UNet call's residuals to the markers:
#: a tuple with one ``{port index: weighted residual}`` dict per active attachment.
RESIDUALS_KEY = "bps_residuals"


class BPSInjectionPoint(nn.Module):
    """Parameter-free marker after a ResBlock/SpatialTransformer where port ``port_index`` adds its residual.

    The forward_timestep_embed patch does the adding; called directly, the marker is the identity,
    so a marker without its patch cannot change the result.
    """

    def __init__(self, port_index: int, port_name: str):
        super().__init__()
        #: Read by the patch handler. A plain attribute so another copy of this pack (trainer and
        #: nodes imported under different package names) recognises these markers too.
        self.bps_port_index = port_index
        self.bps_port_name = port_name

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"port={self.bps_port_name}"


def _fit_to(residual: Tensor, x: Tensor, layer: BPSInjectionPoint) -> Tensor:
    """The residual at the hidden state's size; only the spatial size may differ (rounding at odd sizes)."""
    if residual.shape == x.shape:
        return residual
    if residual.shape[:2] != x.shape[:2] or residual.ndim != x.ndim:
        raise HintError(f"BPS residual for port {getattr(layer, 'bps_port_name', layer.bps_port_index)} is "
                        f"{tuple(residual.shape)} but the UNet hidden state there is {tuple(x.shape)}: this UNet is "
                        f"not laid out like the one the adapter was trained for")
    return F.interpolate(residual, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _inject(layer: BPSInjectionPoint, x: Tensor, emb, context, transformer_options: dict, *args) -> Tensor:
    """forward_timestep_embed patch: add every active attachment's residual for this marker's port."""
    port = layer.bps_port_index
    for residuals in transformer_options.get(RESIDUALS_KEY, ()):
        r = residuals.get(port)
        if r is not None:
            x = x + _fit_to(r, x, layer)
    return x


_INJECT_PATCH = (BPSInjectionPoint, _inject)


def _injected_block(block: nn.Module, port: Port) -> TimestepEmbedSequential:
    """The block's own children under their own names, plus a marker after each ResBlock/SpatialTransformer."""
    children: OrderedDict[str, nn.Module] = OrderedDict()
    for name, child in block.named_children():
        children[name] = child
        if isinstance(child, (ResBlock, SpatialTransformer)):
            children[f"bps_after_{name}"] = BPSInjectionPoint(port.index, port.name)
    return TimestepEmbedSequential(children)


def _has_markers(module: Any) -> bool:
    return isinstance(module, nn.Module) and any(hasattr(m, "bps_port_index") for m in module.children())


def install_injection_points(model: comfy.model_patcher.ModelPatcher, ports: PortMap) -> None:
    """Object-patch the ported blocks of ``model`` and register the marker patch, once per model lineage.

    Idempotent: a model that already carries BPS blocks (an earlier BPSApply in the chain) keeps
    them and its handler, and later attachments only add their own wrapper.
    """
    keys = [f"diffusion_model.{port.module_path}" for port in ports]
    if all(_has_markers(model.object_patches.get(k)) for k in keys):
        return
    for port, key in zip(ports, keys):
        # get_model_object honours object patches other extensions put on this block.
        patched = _injected_block(model.get_model_object(key), port)
        markers = sum(isinstance(m, BPSInjectionPoint) for m in patched.children())
        if markers != port.sublayers:
            # Another extension's object patch changed the block's contents.
            raise ValueError(f"BPS cannot steer this MODEL: UNet block {port.module_path} has {markers} ResBlock/"
                             f"SpatialTransformer layers where {ports.shape.family} has {port.sublayers}; another "
                             f"node has replaced that block")
        model.add_object_patch(key, patched)
    model.set_model_forward_timestep_embed_patch(_INJECT_PATCH)

