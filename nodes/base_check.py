"""Which UNet a MODEL has, and whether an adapter was trained for it.

The check compares shapes (:class:`bps.unet_shape.UNetShape`): the MODEL's is read off its real
UNet module, the adapter's is recorded in its file. A mismatch is refused before any tensor meets
the wrong UNet, with a message naming both, so "SD1.5 adapter on SDXL" and "mini-base adapter on
SD1.5" read as what they are instead of a shape error deep in a forward pass.
"""

from __future__ import annotations

import comfy.model_patcher
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..bps.ports import bps_problem
from ..bps.unet_shape import UNetShape


def describe_model(model: comfy.model_patcher.ModelPatcher) -> str:
    """Short human name of a MODEL's family as ComfyUI detected it, e.g. ``"SD15"``, ``"SDXL"``, ``"Flux"``."""
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__


def model_unet_shape(model: comfy.model_patcher.ModelPatcher) -> UNetShape:
    """The shape of a MODEL's UNet, read off the module ComfyUI built.

    Raises:
        ValueError: the MODEL's diffusion model is not a UNet (Flux, SD3 and other transformers).
    """
    unet = getattr(model.model, "diffusion_model", None)
    if not isinstance(unet, UNetModel):
        raise ValueError(f"BPS cannot steer this MODEL: it is {describe_model(model)} (a {type(unet).__name__}, "
                         f"not a UNet). BPS steers UNet models: SD1.5, SDXL and their fine-tunes")
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    return UNetShape.from_module(unet, context_dim=unet_config.get("context_dim"),
                                 adm_in_channels=unet_config.get("adm_in_channels"))


def check_model_fits(model: comfy.model_patcher.ModelPatcher, adapter_shape: UNetShape,
                     adapter_name: str | None = None) -> UNetShape:
    """Return the MODEL's UNet shape if an adapter trained for ``adapter_shape`` steers it.

    Inpainting UNets (9 input channels) take their base's adapters.

    Raises:
        ValueError: not a UNet, a UNet the port rule does not cover, or another UNet than the
            adapter's; the message names the MODEL's and the adapter's UNets and the fix.
    """
    shape = model_unet_shape(model)
    who = f"the adapter {adapter_name!r}" if adapter_name else "the adapter"
    problem = bps_problem(shape)
    if problem:
        raise ValueError(f"BPS cannot steer this MODEL: it is {describe_model(model)}, {shape.describe()}, and "
                         f"{problem}. Connect an SD1.5 or SDXL checkpoint's MODEL")
    if not shape.same_family(adapter_shape):
        raise ValueError(f"BPS cannot steer this MODEL: it is {shape.describe()}, but {who} was trained for "
                         f"{adapter_shape.describe()}. Connect the MODEL of a {adapter_shape.family} checkpoint, or "
                         f"use an adapter trained for {shape.family}")
    return shape
