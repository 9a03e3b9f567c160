"""Write SD1.5 and SDXL checkpoints with random weights, built from ComfyUI's own model classes.

The trainer's tests and the benchmarks need real checkpoint files that
``comfy.sd.load_checkpoint_guess_config`` detects and loads, without downloading gigabytes of
weights. UNet, VAE and text encoders get seeded random weights (fan-in scaled, so activations stay
in a sane range), and the file is laid out exactly as ComfyUI's own CheckpointSave writes it.

Requires ComfyUI to be importable (the caller boots it first).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

#: The unet_config ComfyUI's model detection reads off a real SD1.5 checkpoint.
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

#: The unet_config ComfyUI's model detection reads off a real SDXL base checkpoint (and its
#: fine-tunes: Illustrious, Pony, NoobAI, ...).
SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

#: Prediction types a random SDXL checkpoint can be written with, as ComfyUI's SDXL model
#: detection reads them off the file: no marker = epsilon, a ``v_pred`` key = v-prediction.
SDXL_PREDICTIONS = ("eps", "v")

#: The SD1.x VAE (AutoencoderKL) layout (SDXL's VAE has the same layout, other weights).
SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                   "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                   "dropout": 0.0}


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    # ComfyUI's ops skip weight init (weights are torch.empty), so every tensor is set here.
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for m in module.modules():
            for leaf, p in m.named_parameters(recurse=False):
                if isinstance(m, norms):
                    p.fill_(1.0 if leaf == "weight" else 0.0)
                elif p.ndim == 1:
                    p.zero_()
                elif isinstance(m, torch.nn.Embedding) or "embedding" in leaf:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
                else:
                    fan_in = math.prod(p.shape[1:])
                    p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))


def random_sd15_model(dtype: torch.dtype = torch.float32, seed: int = 0):
    """A ComfyUI ModelPatcher around an SD1.5 BaseModel whose UNet has seeded random weights.

    Built from ComfyUI's own classes, in memory (no file). ``dtype`` is the UNet's weight dtype;
    ComfyUI's manual cast is set up as it would be for a loaded checkpoint of that dtype.
    """
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    device = comfy.model_management.get_torch_device()
    config = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET_CONFIG))
    config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(dtype, device))
    model = config.get_model({}, device="cpu")
    _randomise(model.diffusion_model, torch.Generator().manual_seed(seed))
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def random_controlnet_network(unet_config: dict, *, seed: int = 2,
                              dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """ComfyUI's ControlNet module (``comfy.cldm.cldm.ControlNet``, 3-channel hint) for the UNet
    layout ``unet_config``, with seeded random weights, built directly in ``dtype``.

    Its ``state_dict()`` is a ControlNet file as ComfyUI's ControlNetLoader reads it. Building in
    fp16 draws the same weights as fp32 (rounded) in half the RAM: a full-size SDXL ControlNet is
    about 5 GB in fp32.
    """
    import comfy.cldm.cldm
    import comfy.ops

    # The ControlNet is the UNet's encoder and middle: no decoder, no output channels.
    config = {k: v for k, v in unet_config.items() if k not in ("out_channels", "transformer_depth_output")}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                     dtype=dtype, device="cpu", **config)
    _randomise(net, torch.Generator().manual_seed(seed))
    return net


def random_sd15_controlnet(seed: int = 2):
    """ComfyUI's SD1.5 ControlNet (3-channel hint) with seeded random weights, built from its config
    and loaded through ComfyUI's own ControlNet loader, as ControlNetLoader would load a file."""
    import comfy.controlnet

    net = random_controlnet_network(SD15_UNET_CONFIG, seed=seed)
    return comfy.controlnet.load_controlnet_state_dict(net.state_dict())


def random_sd15_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-size SD1.5 checkpoint state dict (UNet, VAE, CLIP-L) with seeded random weights."""
    import comfy.ldm.models.autoencoder
    import comfy.model_detection
    import comfy.sd1_clip

    from ..nodes import comfy_compat

    generator = torch.Generator().manual_seed(seed)
    model_config = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({}, device="cpu")
    _randomise(base.diffusion_model, generator)

    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    _randomise(clip, generator)
    clip_sd = clip.state_dict()
    clip_sd.pop("clip_l.transformer.text_model.embeddings.position_ids", None)

    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    _randomise(vae, generator)

    sd = comfy_compat.checkpoint_state_dict(base, clip_sd, vae.state_dict())
    return sd


def write_random_sd15_checkpoint(path: str | os.PathLike, *, seed: int = 0,
                                 dtype: torch.dtype = torch.float16) -> Path:
    """Write a random-weight SD1.5 checkpoint to ``path`` (safetensors) and return the path.

    fp16 halves the file (about 2 GB) and the write time; ComfyUI loads it like any fp16
    SD1.5 checkpoint.
    """
    from safetensors.torch import save_file

    path = Path(path)
    sd = random_sd15_state_dict(seed)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", "note": "random weights for tests"})
    os.replace(tmp, path)
    return path


def sdxl_unet_config(**changes) -> dict:
    """SDXL's unet_config with ``changes`` applied, e.g. a reduced width for tests:
    ``sdxl_unet_config(model_channels=64, transformer_depth=[0, 0, 1, 1, 1, 1], ...)``."""
    unknown = set(changes) - set(SDXL_UNET_CONFIG)
    if unknown:
        raise ValueError(f"not SDXL unet_config keys: {sorted(unknown)}")
    return {**SDXL_UNET_CONFIG, **changes}


def _sdxl_model_config(unet_config: dict | None):
    import comfy.supported_models

    # The SDXL model config itself (not detection): a reduced-width UNet for tests is still built
    # by ComfyUI's SDXL classes (model_base.SDXL: encode_adm, SDXL latent format, SDXL CLIP).
    return comfy.supported_models.SDXL(dict(unet_config or SDXL_UNET_CONFIG))


def _prediction_marker(prediction: str) -> dict[str, torch.Tensor]:
    if prediction not in SDXL_PREDICTIONS:
        raise ValueError(f"prediction must be one of {SDXL_PREDICTIONS}, got {prediction!r}")
    # The key ComfyUI's SDXL.model_type() looks for (and BaseModel.state_dict_for_saving writes).
    return {"v_pred": torch.tensor([])} if prediction == "v" else {}


def random_sdxl_model(unet_config: dict | None = None, *, prediction: str = "eps",
                      dtype: torch.dtype = torch.float32, seed: int = 0):
    """A ComfyUI ModelPatcher around an SDXL BaseModel whose UNet has seeded random weights.

    Args:
        unet_config: the UNet layout (default: full-size SDXL, :data:`SDXL_UNET_CONFIG`); see
            :func:`sdxl_unet_config` for reduced widths.
        prediction: ``"eps"`` or ``"v"`` (v-prediction fine-tunes), as ComfyUI detects it.
        dtype: the UNet's weight dtype (ComfyUI's manual cast set up as for a loaded checkpoint).
    """
    import comfy.model_management
    import comfy.model_patcher

    device = comfy.model_management.get_torch_device()
    config = _sdxl_model_config(unet_config)
    config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(dtype, device))
    model = config.get_model(_prediction_marker(prediction), device="cpu")
    _randomise(model.diffusion_model, torch.Generator().manual_seed(seed))
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def random_sdxl_controlnet(unet_config: dict | None = None, seed: int = 2):
    """ComfyUI's SDXL ControlNet (3-channel hint) with seeded random weights, loaded through ComfyUI's
    own ControlNet loader, as ControlNetLoader would load a file. Weights are fp32."""
    import comfy.controlnet

    net = random_controlnet_network(unet_config or SDXL_UNET_CONFIG, seed=seed)
    return comfy.controlnet.load_controlnet_state_dict(net.state_dict())


def random_sdxl_state_dict(unet_config: dict | None = None, *, prediction: str = "eps", seed: int = 0,
                           dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """SDXL checkpoint state dict (UNet, VAE, CLIP-L + CLIP-G) with seeded random weights.

    Every part is built directly in ``dtype``: a full-size SDXL in fp32 would need ~14 GB of RAM
    before the cast, in fp16 it needs ~7 GB.
    """
    import comfy.ldm.models.autoencoder
    import comfy.sdxl_clip

    from ..nodes import comfy_compat

    generator = torch.Generator().manual_seed(seed)
    model_config = _sdxl_model_config(unet_config)
    model_config.set_inference_dtype(dtype, None)
    base = model_config.get_model(_prediction_marker(prediction), device="cpu")
    _randomise(base.diffusion_model, generator)

    clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=dtype)
    _randomise(clip, generator)
    clip_sd = clip.state_dict()
    del clip

    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    _randomise(vae, generator)

    sd = comfy_compat.checkpoint_state_dict(base, clip_sd, vae.to(dtype).state_dict())
    return sd


def write_random_sdxl_checkpoint(path: str | os.PathLike, unet_config: dict | None = None, *,
                                 prediction: str = "eps", seed: int = 0,
                                 dtype: torch.dtype = torch.float16) -> Path:
    """Write a random-weight SDXL checkpoint to ``path`` (safetensors) and return the path.

    Full size (the default layout) is about 7 GB in fp16 and needs about as much free RAM while it
    is written; ``prediction="v"`` writes the ``v_pred`` marker of v-prediction fine-tunes.
    """
    from safetensors.torch import save_file

    path = Path(path)
    sd = random_sdxl_state_dict(unet_config, prediction=prediction, seed=seed, dtype=dtype)
    # position_ids are integer buffers and v_pred an empty marker: keep their own dtypes
    sd = {k: (v.detach().to(dtype) if v.is_floating_point() and v.numel() else v.detach()).contiguous()
          for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", "note": "random weights for tests"})
    os.replace(tmp, path)
    return path
