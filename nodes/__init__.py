"""ComfyUI nodes of the pack: a thin layer from node inputs to bps/ and nodes/steering.py.

Imported only inside ComfyUI (it needs comfy_api); the pack root's ``comfy_entrypoint`` calls
:func:`comfy_entrypoint` here.
"""

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .apply import BPSApply
from .condition import BPSConditionFromImage
from .hint import BPSHintPreprocessor
from .loader import BPSLoader, register_model_folder
from .omega_preview import BPSOmegaPreview
from .omega_schedule import BPSOmegaSchedule

#: Every node of the pack; node ids are permanent (saved workflows refer to them).
NODES: list[type[io.ComfyNode]] = [BPSLoader, BPSApply, BPSOmegaSchedule, BPSOmegaPreview, BPSHintPreprocessor,
                                   BPSConditionFromImage]


class BPSExtension(ComfyExtension):
    """The pack as ComfyUI's V3 loader sees it."""

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> BPSExtension:
    """Register the ``bps`` model folder and return the extension."""
    register_model_folder()
    return BPSExtension()
