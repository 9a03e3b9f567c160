"""BPSApply: steer a MODEL with an adapter and a condition image."""

from __future__ import annotations

import os

from comfy_api.latest import io

from ..bps.errors import HintError
from ..bps.schedule import make_schedule
from .comfy_compat import search_aliases
from .sockets import CATEGORY, SEARCH_ALIASES, BPSAdapterType, BPSOmegaType
from .steering import attach_bps


def refuse_unfeedable(adapter, node: str) -> None:
    """Raise HintError when a ComfyUI IMAGE cannot be this adapter's condition (e.g. the official style2
    configuration: a 24-channel map at latent resolution), saying what the adapter expects."""
    problem = adapter.config.image_hint_problem()
    if problem:
        name = f" {os.path.basename(adapter.path)!r}" if adapter.path else ""
        raise HintError(f"{node} cannot use the BPS adapter{name}: {problem}")


class BPSApply(io.ComfyNode):
    """Return a steered clone of the MODEL; chained applies add their residuals."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BPSApply",
            **search_aliases(SEARCH_ALIASES),
            display_name="Apply BPS",
            category=CATEGORY,
            description="Steer an SD1.5 model with a BPS adapter: the adapter turns the condition image and "
                        "the timestep into 21 residuals, added with per-port weights after every ResBlock and "
                        "transformer of the UNet. Chain several Apply BPS nodes to combine conditions.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 model (LoRAs and other patches are fine). It is not "
                                                "modified: a steered copy is returned."),
                BPSAdapterType.Input("bps_adapter", tooltip="The adapter, from Load BPS Adapter."),
                io.Image.Input("image", tooltip="The condition image (sketch, layout, segmentation, style), "
                                                "centre-cropped and resized to the generated image; RGB becomes "
                                                "grey for 1-channel adapters. One image for the whole batch, or "
                                                "one per latent (other batch sizes are cut or repeated as "
                                                "ControlNet does; under context windows each frame gets its own)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Multiplies every port weight. 0 leaves the model exactly unchanged; "
                                       "lower values follow the condition more loosely and vary more."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress where steering starts (0 = first step), as on "
                                       "ComfyUI's ControlNet nodes."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress where steering stops (1 = last step)."),
                BPSOmegaType.Input("omega", optional=True,
                                   tooltip="Port weights and their curve over the steps, from BPS Omega "
                                           "Schedule. Default: the adapter's own weights, constant."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where the steering acts (1) and where it does not (0), resized to "
                                      "the generated image; one mask or one per latent (as the image)."),
                io.Float.Input("uncond_multiplier", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Scales the steering on the negative (unconditional) half of CFG. 1 "
                                       "steers both halves alike (the paper's rule); lower values steer the "
                                       "negative prompt less, as soft ControlNet weights do. Costs no extra "
                                       "adapter computation."),
            ],
            outputs=[io.Model.Output(tooltip="The steered model, for a sampler or another Apply BPS.")],
        )

    @classmethod
    def execute(cls, model, bps_adapter, image, strength: float, start_percent: float, end_percent: float,
                omega=None, mask=None, uncond_multiplier: float = 1.0) -> io.NodeOutput:
        refuse_unfeedable(bps_adapter, "Apply BPS")
        schedule = make_schedule(bps_adapter.omega, omega, strength=strength, start=start_percent, end=end_percent,
                                 ports=bps_adapter.ports)
        # IMAGE is (B, H, W, C); B_phi makes its input contiguous itself (BPSNetwork.prepare_hint).
        return io.NodeOutput(attach_bps(model, bps_adapter, image.movedim(-1, 1), schedule, mask,
                                        uncond_multiplier=uncond_multiplier))
