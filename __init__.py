"""ComfyUI-BPS: Bayesian Power Steering nodes for ComfyUI.

ComfyUI's loader calls ``comfy_entrypoint``. The node modules are imported only then, so the pack
root also imports outside ComfyUI (pytest imports it as a package while collecting tests).
"""


async def comfy_entrypoint():
    """Register the BPS model folder and return the pack's ComfyExtension."""
    from .nodes import comfy_entrypoint as nodes_entrypoint
    return await nodes_entrypoint()


__all__ = ["comfy_entrypoint"]
