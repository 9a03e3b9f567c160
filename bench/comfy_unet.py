"""Random-weight ComfyUI models for the benchmarks, booted the way the trainer boots ComfyUI."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# The tests' host helper boots ComfyUI exactly as the trainer does; the benchmarks reuse it.
sys.path.insert(0, str(ROOT / "tests"))
import comfy_host  # noqa: E402


def comfyui_available() -> bool:
    """True when COMFYUI_PATH names a ComfyUI checkout."""
    path = os.environ.get("COMFYUI_PATH")
    return bool(path) and os.path.isfile(os.path.join(path, "comfy", "model_patcher.py"))


def boot_comfyui():
    """Import ComfyUI from COMFYUI_PATH (CPU mode without CUDA) and this pack; return the pack."""
    comfy_host.boot()
    pack = comfy_host.trainer_pack()
    for sub in ("bps", "nodes.steering"):
        importlib.import_module(f"{pack.__name__}.{sub}")
    return pack


def comfy_version() -> str:
    """ComfyUI's version string, also from a process that has not booted ComfyUI."""
    root = str(comfy_host.comfyui_path())
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfyui_version
    return comfyui_version.__version__


def random_sd15_model(dtype: torch.dtype | None = None, seed: int = 0):
    """ComfyUI ModelPatcher of an SD1.5 model with seeded random weights, in ``dtype`` (default:
    the dtype ComfyUI picks for an SD1.5 UNet on this device)."""
    pack = boot_comfyui()
    import comfy.model_management
    if dtype is None:
        dtype = comfy.model_management.unet_dtype()
    return pack.train.random_checkpoint.random_sd15_model(dtype, seed=seed)


def build_sd15_unet(device: torch.device, dtype: torch.dtype):
    """ComfyUI's SD1.5 UNetModel with random weights, or None when COMFYUI_PATH is unset."""
    if not comfyui_available():
        return None
    return random_sd15_model(dtype).model.diffusion_model.to(device=device, dtype=dtype).eval()
