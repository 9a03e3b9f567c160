"""ComfyUI nodes of the pack: a thin layer from node inputs to bps/ and nodes/steering.py."""

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .apply import BPSApply
from .loader import BPSLoader, register_model_folder
from .omega_schedule import BPSOmegaSchedule


class BPSExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [BPSLoader, BPSApply, BPSOmegaSchedule]


async def comfy_entrypoint() -> BPSExtension:
    register_model_folder()
    return BPSExtension()
