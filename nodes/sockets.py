"""The pack's custom ComfyUI socket types and its node category."""

from comfy_api.latest import io

#: A loaded adapter (:class:`bps.Adapter`): network, default port weights, metadata.
BPSAdapterType = io.Custom("BPS_ADAPTER")
#: Adapter-independent port weights and curve (:class:`bps.schedule.OmegaSpec`).
BPSOmegaType = io.Custom("BPS_OMEGA")

#: Every node of the pack sits here in the Add Node menu.
CATEGORY = "conditioning/bps"
#: What people type into the node search when they look for a condition-image adapter; the V3
#: search aliases of Load BPS Adapter and Apply BPS (where the ComfyUI version has them).
SEARCH_ALIASES = ("sketch control", "t2i adapter", "controlnet alternative", "power steering")
