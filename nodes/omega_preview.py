"""BPSOmegaPreview: show what an omega schedule does, as an image."""

from __future__ import annotations

import torch

from comfy_api.latest import io, ui

from ..bps.ports import SD15_PORTS
from ..bps.schedule import make_schedule
from .schedule_plot import render_schedule
from .sockets import CATEGORY, BPSAdapterType, BPSOmegaType


class BPSOmegaPreview(io.ComfyNode):
    """Plot port weights over sampling progress, resolved exactly as Apply BPS resolves them."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BPSOmegaPreview",
            display_name="BPS Omega Preview",
            category=CATEGORY,
            description="Plot the weight of each of the 21 BPS ports over the sampling steps, for an omega "
                        "schedule with the same strength/start/end as on Apply BPS: curves coloured by port "
                        "group (encoder, middle, decoder), steering-off ranges shaded, and each port's peak "
                        "weight as a bar.",
            inputs=[
                BPSOmegaType.Input("omega", optional=True,
                                   tooltip="From BPS Omega Schedule. Default: the adapter's own weights, "
                                           "constant."),
                BPSAdapterType.Input("bps_adapter", optional=True,
                                     tooltip="The adapter whose own weights the 'paper' and E/M/D presets use. "
                                             "Default: SD1.5's top-heavy weights (encoder 16/8/4/2, "
                                             "middle 16, decoder 1)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="As on Apply BPS: multiplies every weight."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="As on Apply BPS: progress where steering starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="As on Apply BPS: progress where steering stops."),
                io.Int.Input("width", default=768, min=256, max=4096, step=8, tooltip="Plot width in pixels."),
                io.Int.Input("height", default=512, min=256, max=4096, step=8, tooltip="Plot height in pixels."),
            ],
            outputs=[io.Image.Output(display_name="plot", tooltip="The plot as an image (also shown on the node).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, strength: float, start_percent: float, end_percent: float, width: int, height: int,
                omega=None, bps_adapter=None) -> io.NodeOutput:
        ports = bps_adapter.ports if bps_adapter is not None else SD15_PORTS
        defaults = bps_adapter.omega if bps_adapter is not None else ports.default_omega
        schedule = make_schedule(defaults, omega, strength=strength, start=start_percent, end=end_percent,
                                 ports=ports)
        image = torch.from_numpy(render_schedule(schedule, width, height, ports)).unsqueeze(0)
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))
