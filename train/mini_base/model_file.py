"""The mini base's UNet: ComfyUI's own SD1.5 model class at a small width, and its file.

The UNet keeps SD1.5's block layout (4 levels, 2 ResBlocks per level, a SpatialTransformer after
the ResBlocks of the first three levels and in the middle, 12 input and 12 output blocks: the
same 21 BPS ports with the same sub-layer counts) at ``model_channels`` 64 with ``channel_mult``
(1, 1, 2, 2) (64, 64, 128 and 128 channels), a 64-wide text context that the stand-in text encoder
fills with zeros, and 32-channel attention heads.

Why 64 channels at the first level: ComfyUI's UNet normalises with ``GroupNorm(32, channels)``, and
its output layer normalises the first level's channels. At 32 channels every group is a single
channel, so the output layer subtracts each channel's spatial mean. The network then cannot
express the mean of the noise it predicts, and samples keep the mean colour of their starting
noise: bases trained at width 32 drew their shapes on coloured backgrounds (white shapes after 300
steps; the first default recipe, coloured shapes, after 500). With two channels per group the
difference of their means passes; at width 64, backgrounds were mostly dark after 300 steps. The
deeper levels stay narrow to keep a step cheap (batch 64: about 2.4 s on one CPU thread). It is
built by
``comfy.supported_models.SD15`` -> ``comfy.model_base.BaseModel``, so its noise schedule
(``model_sampling``: 1000 scaled-linear betas, eps prediction) and latent format are SD1.5's.

The file is a safetensors of the UNet's weights under ``model.diffusion_model.`` (as in a
checkpoint) with the recipe in its metadata under :data:`METADATA_KEY`. ComfyUI's own checkpoint
loader cannot detect this UNet (its model detection knows SD1.5 only at full width), so the
trainer recognises the metadata and builds the model here (``train/base_model.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

#: Metadata key that marks a mini base file; its value is the JSON recipe.
METADATA_KEY = "comfyui_bps.mini_base"
UNET_PREFIX = "model.diffusion_model."

#: SD1.5's unet_config (as ComfyUI's model detection reads it off a real checkpoint) at a small width.
MINI_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 16, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 64,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 1, 2, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 64, "num_heads": -1, "num_head_channels": 32, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


class MiniBaseFileError(ValueError):
    """A file that claims to be a mini base but cannot be read as one."""


def build_model(unet_config: dict[str, Any] | None = None, *, initialise: bool = False):
    """A ComfyUI ModelPatcher around ``comfy.supported_models.SD15``'s BaseModel with ``unet_config``.

    ``initialise`` gives the weights PyTorch's default initialisation with the last conv of every
    residual branch, every transformer's ``proj_out`` and the output conv at zero (as the LDM
    code does), for training from scratch; otherwise the weights are left for a state dict.
    Seed the global RNG first for a reproducible start.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = dict(unet_config or MINI_UNET_CONFIG)
    config = comfy.supported_models.SD15(unet_config)
    # SD15 forces SD1.5's 8 heads; 32-channel heads (2 at the first level) keep self-attention over
    # the 256 positions of a 16x16 latent affordable on a CPU. The block layout is unchanged.
    for key in ("num_heads", "num_head_channels"):
        config.unet_config[key] = unet_config[key]
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device="cpu")
    if initialise:
        _initialise(model.diffusion_model)
    device = comfy.model_management.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device,
                                               offload_device=comfy.model_management.unet_offload_device())
    patcher.model_options["transformer_options"]["optimized_attention_override"] = pytorch_attention
    return patcher


def pytorch_attention(func, *args, **kwargs):
    """ComfyUI ``optimized_attention_override``: PyTorch's scaled_dot_product_attention, whatever
    attention ComfyUI picked at start-up.

    On a CPU ComfyUI picks its sub-quadratic attention, which splits keys into chunks when free RAM
    runs low and then exponentiates in place: a backward pass through it fails ("exp(): functions
    with out=... arguments don't support automatic differentiation"). Training the mini base and
    an adapter on it backpropagates through every attention layer, so the mini base always uses
    PyTorch's attention (differentiable, and the same numbers whatever memory is free).
    """
    from comfy.ldm.modules.attention import attention_pytorch
    return attention_pytorch(*args, **kwargs)


def _initialise(unet: torch.nn.Module) -> None:
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    # ComfyUI's ops skip initialisation (they expect a checkpoint): call torch's own.
    for m in unet.modules():
        for base in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(m, base):
                base.reset_parameters(m)
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, ResBlock):
                for p in m.out_layers[-1].parameters():
                    p.zero_()
            elif isinstance(m, SpatialTransformer):
                for p in m.proj_out.parameters():
                    p.zero_()
        for p in unet.out[-1].parameters():
            p.zero_()


def save_mini_base(path: str | Path, model, recipe: dict[str, Any]) -> Path:
    """Write the UNet's weights and the recipe (which must hold ``unet_config``) atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {UNET_PREFIX + k: v.detach().float().contiguous().cpu()
          for k, v in model.model.diffusion_model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(sd, str(tmp), metadata={METADATA_KEY: json.dumps(recipe, sort_keys=True), "format": "pt"})
    os.replace(tmp, path)
    return path


def read_recipe(path: str | Path) -> dict[str, Any] | None:
    """The recipe of a mini base file, or None for any other file (read from the header only)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - not a readable safetensors: not ours, the caller's loader reports it
        return None
    if METADATA_KEY not in meta:
        return None
    try:
        recipe = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise MiniBaseFileError(f"{path} is marked as a mini base but its recipe is not JSON ({e}); rebuild it "
                                f"with train/mini_base/build.py") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("unet_config"), dict):
        raise MiniBaseFileError(f"{path} is marked as a mini base but its recipe has no unet_config; rebuild it "
                                f"with train/mini_base/build.py")
    return recipe


def load_mini_base(path: str | Path):
    """(ModelPatcher, recipe) of a mini base file, its weights frozen.

    Raises:
        MiniBaseFileError: not a mini base file, or its weights do not fit its unet_config.
    """
    from safetensors.torch import load_file

    recipe = read_recipe(path)
    if recipe is None:
        raise MiniBaseFileError(f"{path} is not a mini base file (no {METADATA_KEY!r} metadata)")
    model = build_model(recipe["unet_config"])
    sd = {k[len(UNET_PREFIX):]: v for k, v in load_file(str(path)).items() if k.startswith(UNET_PREFIX)}
    missing, unexpected = model.model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise MiniBaseFileError(f"{path}: the weights do not fit its unet_config (missing {missing[:3]}..., "
                                f"unexpected {unexpected[:3]}...); rebuild it with train/mini_base/build.py")
    for p in model.model.parameters():
        p.requires_grad_(False)
    return model, recipe
