"""Random-weight ComfyUI models for the benchmarks, booted the way the trainer boots ComfyUI."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def comfyui_available() -> bool:
    """True when COMFYUI_PATH names a ComfyUI checkout."""
    path = os.environ.get("COMFYUI_PATH")
    return bool(path) and os.path.isfile(os.path.join(path, "comfy", "model_patcher.py"))


def _trainer_entry():
    name = "comfyui_bps_train_entry"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "train" / "train_bps.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def boot_comfyui():
    """Import ComfyUI from COMFYUI_PATH (CPU mode without CUDA) and this pack; return the pack."""
    entry = _trainer_entry()
    entry.boot_comfyui(Path(os.environ["COMFYUI_PATH"]).resolve())
    pack = entry.import_pack()
    for sub in ("bps", "nodes.steering", "train.random_checkpoint"):
        importlib.import_module(f"{pack.__name__}.{sub}")
    return pack


def comfy_version() -> str:
    """ComfyUI's version string."""
    import comfyui_version
    return comfyui_version.__version__


def random_sd15_model(dtype: torch.dtype | None = None, seed: int = 0):
    """ComfyUI ModelPatcher of an SD1.5 model with seeded random weights.

    ComfyUI's layers skip weight init, so every weight is set here: uninitialised memory would
    time NaN or denormal arithmetic.
    """
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    pack = boot_comfyui()
    random_checkpoint = pack.train.random_checkpoint
    config = comfy.model_detection.model_config_from_unet_config(dict(random_checkpoint.SD15_UNET_CONFIG))
    if dtype is None:
        dtype = comfy.model_management.unet_dtype()
    config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(
        dtype, comfy.model_management.get_torch_device()))
    model = config.get_model({}, device="cpu")
    random_checkpoint._randomise(model.diffusion_model, torch.Generator().manual_seed(seed))
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def build_sd15_unet(device: torch.device, dtype: torch.dtype):
    """ComfyUI's SD1.5 UNetModel with random weights, or None when COMFYUI_PATH is unset."""
    if not comfyui_available():
        return None
    return random_sd15_model(dtype).model.diffusion_model.to(device=device, dtype=dtype).eval()
