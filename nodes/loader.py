"""BPSLoader: load an adapter from ComfyUI's ``models/bps`` folder."""

from __future__ import annotations

import torch

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..bps.adapter_file import load_adapter
from .types import CATEGORY, BPSAdapterType

FOLDER = "bps"


def register_model_folder() -> None:
    """Make ``models/bps`` (and ``bps:`` entries of extra_model_paths.yaml) a .safetensors folder."""
    default = f"{folder_paths.models_dir}/{FOLDER}"
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, {".safetensors"})
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], {".safetensors"})


def adapter_dtype() -> torch.dtype:
    """The dtype ComfyUI runs an SD1.5 UNet in on this device (fp32 on CPU, fp16/bf16 on GPU), so the
    adapter computes in the UNet's dtype."""
    dtype = comfy.model_management.unet_dtype(
                                              supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])
    manual = comfy.model_management.unet_manual_cast(dtype, comfy.model_management.get_torch_device())
    return manual or dtype


class BPSLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BPSLoader",
            display_name="Load BPS Adapter",
            category=CATEGORY,
            description="Load a Bayesian Power Steering adapter (.safetensors) from models/bps. "
                        "Official BPS-v1-1 checkpoints must be converted first with "
                        "`python -m bps.convert_official`.",
            inputs=[
                io.Combo.Input("adapter_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="Adapter file in ComfyUI/models/bps (or a 'bps:' folder of "
                                       "extra_model_paths.yaml)."),
            ],
            outputs=[BPSAdapterType.Output(display_name="bps_adapter",
                                           tooltip="The adapter network and its default port weights.")],
        )

    @classmethod
    def execute(cls, adapter_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, adapter_name)
        return io.NodeOutput(load_adapter(path, dtype=adapter_dtype()))
