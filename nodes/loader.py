"""BPSLoader: load an adapter from ComfyUI's ``bps`` model folder."""

from __future__ import annotations

import os
from typing import Any

import torch

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from .adapter_cache import ADAPTERS, file_identity
from .comfy_compat import search_aliases
from .sockets import CATEGORY, SEARCH_ALIASES, BPSAdapterType

#: Model folder name: ``ComfyUI/models/bps`` and ``bps:`` entries of extra_model_paths.yaml.
FOLDER = "bps"
EXTENSIONS = {".safetensors"}


def register_model_folder() -> None:
    """Register ``models/bps`` as a ``.safetensors`` model folder with ComfyUI's folder_paths.

    Paths added earlier under the ``bps`` key (extra_model_paths.yaml is read before custom nodes
    load, and registers unknown keys without extensions) are kept.
    """
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths = list(folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))[0])
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))


def adapter_dtype() -> torch.dtype:
    """The dtype ComfyUI computes an SD1.5 UNet in on this device (fp32 on CPU, fp16/bf16 on most
    GPUs): the adapter is loaded in it, so it runs in the UNet's compute dtype without a copy."""
    device = comfy.model_management.get_torch_device()
    dtype = comfy.model_management.unet_dtype(device=device,
                                              supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])
    return comfy.model_management.unet_manual_cast(dtype, device) or dtype


class BPSLoader(io.ComfyNode):
    """Load Bayesian Power Steering adapter files (.safetensors made by this pack's trainer or converter)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BPSLoader",
            **search_aliases(SEARCH_ALIASES),
            display_name="Load BPS Adapter",
            category=CATEGORY,
            description="Load a Bayesian Power Steering adapter (.safetensors) from models/bps. Adapters "
                        "steer SD1.5 with a condition image (sketch, layout, segmentation, style). Official "
                        "BPS-v1-1 checkpoints must be converted first: python -m bps.convert_official.",
            inputs=[
                io.Combo.Input("adapter_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="Adapter file in ComfyUI/models/bps (or a folder listed under 'bps:' in "
                                       "extra_model_paths.yaml). Only .safetensors files are listed."),
            ],
            outputs=[BPSAdapterType.Output(display_name="bps_adapter",
                                           tooltip="The adapter network and its default port weights, for "
                                                   "Apply BPS.")],
        )

    @classmethod
    def fingerprint_inputs(cls, adapter_name: str) -> Any:
        """The file's identity: ComfyUI re-executes the node when a file under the same name was
        retrained or replaced, instead of serving the old adapter from its cache."""
        path = folder_paths.get_full_path(FOLDER, adapter_name)
        try:
            return file_identity(path) if path else adapter_name
        except OSError:
            return adapter_name  # execute() reports the missing file

    @classmethod
    def execute(cls, adapter_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, adapter_name)
        # The process-wide cache: a loader re-executed after ComfyUI dropped its output reads nothing.
        return io.NodeOutput(ADAPTERS.load(path, adapter_dtype()))
