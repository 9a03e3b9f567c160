"""BPSOmegaSchedule: per-port weights and their curve over the sampling steps."""

from __future__ import annotations

from comfy_api.latest import io

from ..bps.schedule import CURVES, PRESETS, make_omega_spec
from .sockets import CATEGORY, BPSOmegaType

_PRESET_HELP = ("Base weights. paper: the adapter's own (top-heavy) weights; uniform: 1 on every port; E, M, D "
                "and their combinations keep the adapter's weights only on the encoder (E), middle (M) and "
                "decoder (D) ports and switch the others off, as in the paper's integration-mode study.")


def _group(name: str, what: str) -> io.Float.Input:
    return io.Float.Input(name, default=1.0, min=0.0, max=100.0, step=0.01,
                          tooltip=f"Multiplier for the {what} ports, on top of the preset.")


class BPSOmegaSchedule(io.ComfyNode):
    """Describe the port weights (omega) independently of any adapter."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BPSOmegaSchedule",
            display_name="BPS Omega Schedule",
            category=CATEGORY,
            description="Choose how strongly each of the 21 BPS ports steers and how that changes over the "
                        "sampling steps: preset, group multipliers, single-port overrides and a curve. "
                        "Connect to Apply BPS's omega input (and to BPS Omega Preview to see it).",
            inputs=[
                io.Combo.Input("preset", options=list(PRESETS), default="paper", tooltip=_PRESET_HELP),
                _group("encoder", "8 encoder (input block)"),
                _group("middle", "middle-block"),
                _group("decoder", "12 decoder (output block)"),
                io.String.Input("overrides", default="", multiline=False,
                                tooltip="Set single ports, applied last: 'input_1=0.5, middle=0, output_11=2' "
                                        "(ports input_1, 2, 4, 5, 7, 8, 10, 11, middle, output_0..11, or "
                                        "indices 0..20), or exactly 21 comma-separated weights. Empty: none."),
                io.Combo.Input("curve", options=list(CURVES), default="constant",
                               tooltip="Multiplier over sampling progress p (0 = first, noisiest step; 1 = "
                                       "last): constant 1; linear_down 1->0; linear_up 0->1; cosine 1->0 "
                                       "(half cosine); keyframes: the keyframes text."),
                io.String.Input("keyframes", default="0.0:1.0, 0.6:0.4, 1.0:0.0", multiline=False,
                                tooltip="progress:value pairs, linearly interpolated and held flat beyond the "
                                        "ends; read only when curve is 'keyframes'."),
            ],
            outputs=[BPSOmegaType.Output(display_name="omega",
                                         tooltip="Port weights and curve, for Apply BPS and BPS Omega Preview.")],
        )

    @classmethod
    def execute(cls, preset: str, encoder: float, middle: float, decoder: float, overrides: str, curve: str,
                keyframes: str) -> io.NodeOutput:
        return io.NodeOutput(make_omega_spec(preset, encoder, middle, decoder, overrides, curve, keyframes))
