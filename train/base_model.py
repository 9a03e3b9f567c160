"""Load the frozen SD1.5 checkpoint with ComfyUI's own loader and expose what training needs.

UNet, VAE and CLIP come from ``comfy.sd.load_checkpoint_guess_config``, the function behind
ComfyUI's CheckpointLoaderSimple, so the trainer sees exactly the model the nodes see: same
weights, same latent format (scale 0.18215), same noise schedule (``model_sampling``).
ComfyUI must already be imported (train_bps.py does that).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("bps.train")


class BaseModelError(ValueError):
    """The checkpoint is missing, unreadable, or not an SD1.5 model."""


@dataclass
class BaseModels:
    """The frozen parts of SD1.5, as ComfyUI objects."""

    model: Any          # comfy.model_patcher.ModelPatcher around the SD1.5 BaseModel
    clip: Any | None    # comfy.sd.CLIP
    vae: Any | None     # comfy.sd.VAE
    path: Path

    @property
    def model_sampling(self) -> Any:
        """ComfyUI's ModelSamplingDiscrete of the model (sigmas of the 1000-step schedule)."""
        return self.model.get_model_object("model_sampling")

    @property
    def latent_scale(self) -> float:
        """Latent scale factor of the model's latent format (0.18215 for SD1.5)."""
        return float(self.model.model.latent_format.scale_factor)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) pixels in [0, 1] -> model-space latents (B, 4, H/8, W/8), scale applied.

        ComfyUI's VAE.encode takes [0, 1] NHWC and maps to [-1, 1] itself; it returns the
        posterior mode, so cached latents are deterministic.
        """
        return self.model.model.process_latent_in(self.vae.encode(pixels))

    def encode_text(self, prompt: str) -> torch.Tensor:
        """CLIP conditioning (1, 77*k, 768) of a prompt, as CLIPTextEncode computes it."""
        tokens = self.clip.tokenize(prompt)
        return self.clip.encode_from_tokens(tokens)

    @property
    def unet_shape(self) -> Any:
        """The UNet's shape (:class:`bps.unet_shape.UNetShape`): what B_phi and its ports are built for."""
        from ..nodes.base_check import model_unet_shape
        return model_unet_shape(self.model)

    def free_encoders(self) -> None:
        """Drop CLIP and VAE once everything is cached (validation keeps its own reference)."""
        self.clip = None
        self.vae = None


def checkpoint_unet_dtype(path: str | Path) -> torch.dtype | None:
    """dtype of most UNet weights in a .safetensors checkpoint (header only); None if unknown."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        from safetensors import safe_open
        counts: dict[str, int] = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                if k.startswith("model.diffusion_model."):
                    s = f.get_slice(k)
                    n = 1
                    for d in s.get_shape():
                        n *= d
                    counts[s.get_dtype()] = counts.get(s.get_dtype(), 0) + n
    except Exception:  # noqa: BLE001 - unreadable header: the loader reports it properly
        return None
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    return names.get(max(counts, key=counts.get)) if counts else None


def unet_weight_dtype(mixed_precision: str, device: torch.device, file_dtype: torch.dtype | None) -> torch.dtype:
    """dtype the frozen UNet's weights are stored in.

    ``no`` computes in fp32. On CPU an fp16 checkpoint stays fp16 in memory and ComfyUI casts
    each layer to fp32 as it runs: bit-identical to upcasting the file, at half the memory.
    """
    if mixed_precision == "fp16":
        return torch.float16
    if mixed_precision == "bf16":
        return torch.bfloat16
    if device.type == "cpu" and file_dtype == torch.float16:
        return torch.float16
    return torch.float32


def _check_sd15(model: Any, path: Path) -> None:
    from ..bps.unet_shape import SD15_SHAPE
    from ..nodes.base_check import model_unet_shape
    cfg = getattr(model.model, "model_config", None)
    name = type(cfg).__name__ if cfg is not None else "unknown"
    try:
        shape = model_unet_shape(model)
    except ValueError:
        shape = None
    if shape is None or shape.signature() != SD15_SHAPE or shape.in_channels != 4:
        raise BaseModelError(f"{path} is a {name} model, not Stable Diffusion 1.5: BPS adapters steer the SD1.5 "
                             f"UNet (320 channels, 768-wide text context). Pass an SD1.5 checkpoint "
                             f"(or a fine-tune of it) with --ckpt.")


def load_mini_base_models(path: Path) -> BaseModels | None:
    """The mini base (``train/mini_base``) with its weight-free VAE and text encoder, if ``path`` is
    one; None for any other file.

    ComfyUI's checkpoint loader cannot detect the mini base's small SD1.5 UNet, and the file holds
    no VAE or CLIP: the stand-ins take their place. It stays in float32 whatever --mixed-precision
    says (8.6M weights; its 16x16 latents would gain nothing from 16 bits).
    """
    from .mini_base.model_file import MiniBaseFileError, load_mini_base, read_recipe
    from .mini_base.stand_ins import StandInTextEncoder, StandInVAE

    try:
        if read_recipe(path) is None:
            return None
        model, recipe = load_mini_base(path)
    except MiniBaseFileError as e:
        raise BaseModelError(str(e)) from e
    log.info("loaded the mini base %s (recipe %s): a small SD1.5 UNet with the stand-in VAE and text encoder",
             path.name, recipe.get("recipe_hash", "?"))
    return BaseModels(model=model, clip=StandInTextEncoder(recipe["unet_config"]["context_dim"]),
                      vae=StandInVAE(), path=path)


def load_base_models(ckpt: str | Path, *, unet_dtype: torch.dtype, need_clip: bool = True,
                     need_vae: bool = True) -> BaseModels:
    """Load an SD1.5 checkpoint through ComfyUI (or a mini base file, ``train/mini_base``) and freeze it.

    Raises:
        BaseModelError: missing file, undetectable model type, or not SD1.5.
    """
    import comfy.sd

    path = Path(ckpt)
    if not path.is_file():
        raise BaseModelError(f"checkpoint {path} does not exist; pass the SD1.5 .safetensors/.ckpt file with "
                             f"--ckpt (e.g. ComfyUI/models/checkpoints/v1-5-pruned-emaonly.safetensors)")
    mini = load_mini_base_models(path)
    if mini is not None:
        return mini
    embeddings = None
    try:
        import folder_paths
        embeddings = folder_paths.get_folder_paths("embeddings")
    except Exception:  # noqa: BLE001 - textual-inversion embeddings are optional
        pass
    try:
        out = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=need_vae, output_clip=need_clip, embedding_directory=embeddings,
            model_options={"dtype": unet_dtype})
    except Exception as e:  # noqa: BLE001 - the loader raises plain RuntimeErrors
        raise BaseModelError(f"ComfyUI cannot load {path} as a checkpoint: {e}") from e
    model, clip, vae = out[0], out[1], out[2]
    if model is None:
        raise BaseModelError(f"{path} holds no diffusion model; pass a full SD1.5 checkpoint")
    _check_sd15(model, path)
    if need_clip and clip is None:
        raise BaseModelError(f"{path} has no CLIP text encoder; pass a full SD1.5 checkpoint (UNet, VAE, CLIP)")
    if need_vae and vae is None:
        raise BaseModelError(f"{path} has no VAE; pass a full SD1.5 checkpoint (UNet, VAE, CLIP)")
    for p in model.model.parameters():
        p.requires_grad_(False)
    log.info("loaded %s: UNet weights %s, compute %s", path.name, model.model.get_dtype(),
             model.model.manual_cast_dtype or model.model.get_dtype())
    return BaseModels(model=model, clip=clip, vae=vae, path=path)
