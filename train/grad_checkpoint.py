"""Gradient checkpointing for the frozen UNet: recompute its sub-layers in the backward pass.

The UNet is frozen but gradients must still flow through it to B_phi, so its activations are
kept for the backward pass; at 512 px that dominates memory. Each ResBlock and
SpatialTransformer instance gets a forward that runs under ``torch.utils.checkpoint``. Patching
instances (not the block containers) leaves the BPS injection untouched: the steering code
adds residuals after these sub-layers, outside the checkpointed region.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.utils.checkpoint


def _checkpointed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return run


def checkpoint_unet(diffusion_model: torch.nn.Module) -> Callable[[], None]:
    """Checkpoint every ResBlock and SpatialTransformer of a ComfyUI UNet; returns the undo."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    patched = []
    for module in diffusion_model.modules():
        if isinstance(module, (ResBlock, SpatialTransformer)) and "forward" not in module.__dict__:
            module.forward = _checkpointed(module.forward)
            patched.append(module)

    def undo() -> None:
        for module in patched:
            module.__dict__.pop("forward", None)
    return undo
