"""Custom ComfyUI socket types of the pack."""

from comfy_api.latest import io

#: A loaded adapter (bps.Adapter).
BPSAdapterType = io.Custom("BPS_ADAPTER")
#: Adapter-independent port weights and curve (bps.schedule.OmegaSpec).
BPSOmegaType = io.Custom("BPS_OMEGA")

CATEGORY = "conditioning/bps"
