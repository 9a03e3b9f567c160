"""Load the frozen base checkpoint (SD1.5 or SDXL) with ComfyUI's own loader and expose what
training needs.

UNet, VAE and text encoders come from ``comfy.sd.load_checkpoint_guess_config``, the function
behind ComfyUI's CheckpointLoaderSimple, so the trainer sees exactly the model the nodes see: same
weights, same latent format (scale 0.18215 for SD1.5, 0.13025 for SDXL), same noise schedule and
prediction type (``model_sampling``), same text conditioning (SDXL: CLIP-L + CLIP-G, the pooled
CLIP-G output and the size/crop embedding, as CLIPTextEncode and the sampler give them).
ComfyUI must already be imported (train_bps.py does that).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cache import PromptEmbedding

log = logging.getLogger("bps.train")

#: Base models the trainer trains adapters for.
SUPPORTED_BASES = "Stable Diffusion 1.5 or SDXL (and their fine-tunes)"


class BaseModelError(ValueError):
    """The checkpoint is missing, unreadable, or not a base model BPS trains on."""


@dataclass
class BaseModels:
    """The frozen parts of the base model (SD1.5 or SDXL), as ComfyUI objects."""

    model: Any          # comfy.model_patcher.ModelPatcher around the BaseModel
    clip: Any | None    # comfy.sd.CLIP
    vae: Any | None     # comfy.sd.VAE
    path: Path
    #: Side in pixels the base was trained at, where the file says (the mini base); else None and
    #: the family's (512 for SD1.5, 1024 for SDXL).
    trained_size: int | None = None

    @property
    def native_resolution(self) -> int:
        """Side in pixels the base model was trained at: where adapters for it steer best."""
        return self.trained_size or {"SD1.5": 512, "SDXL": 1024}[self.family]

    @property
    def model_sampling(self) -> Any:
        """ComfyUI's ModelSamplingDiscrete of the model (sigmas of the 1000-step schedule)."""
        return self.model.get_model_object("model_sampling")

    @property
    def latent_scale(self) -> float:
        """Latent scale factor of the model's latent format (0.18215 SD1.5, 0.13025 SDXL)."""
        return float(self.model.model.latent_format.scale_factor)

    @property
    def family(self) -> str:
        """``"SD1.5"`` or ``"SDXL"``."""
        return base_family(self.model)

    @property
    def takes_pooled(self) -> bool:
        """True when the UNet takes ``y`` (SDXL: pooled text plus size/crop embedding, added to the
        time embedding through ``label_emb``)."""
        return bool(getattr(self.model.model, "adm_channels", 0))

    @property
    def prediction(self) -> str:
        """What the UNet predicts: ``"eps"`` or ``"v"`` (v-prediction fine-tunes), from ComfyUI's
        ``model_sampling``."""
        return prediction_type(self.model_sampling)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) pixels in [0, 1] -> model-space latents (B, 4, H/8, W/8), scale applied.

        ComfyUI's VAE.encode takes [0, 1] NHWC and maps to [-1, 1] itself; it returns the
        posterior mode, so cached latents are deterministic.
        """
        return self.model.model.process_latent_in(self.vae.encode(pixels))

    def encode_text(self, prompt: str) -> torch.Tensor:
        """Text conditioning (1, 77*k, width) of a prompt, as CLIPTextEncode computes it."""
        return self.encode_prompt(prompt).cond

    def encode_prompt(self, prompt: str) -> PromptEmbedding:
        """Conditioning and, for SDXL, the pooled output of a prompt, as CLIPTextEncode gives them."""
        tokens = self.clip.tokenize(prompt)
        if not self.takes_pooled:  # SD1.5 (and the mini base's stand-in encoder, which has no pooled output)
            return PromptEmbedding(self.clip.encode_from_tokens(tokens), None)
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        return PromptEmbedding(cond, pooled)

    def unet_label(self, pooled: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor | None:
        """The UNet's ``y`` for a batch of pooled outputs ``(B, 1280)`` at training ``size`` (h, w) px.

        Exactly what ComfyUI's sampler computes for a CLIPTextEncode conditioning at that image size:
        the model's own ``encode_adm`` with original size = target size = the image size and crop
        (0, 0). None for UNets without ``y`` (SD1.5).
        """
        if not self.takes_pooled:
            return None
        if pooled is None:
            raise BaseModelError("this model conditions on the pooled text output but none was given; "
                                 "delete the trainer's cache folder (--cache-dir) so it is encoded again")
        height, width = size
        return self.model.model.encode_adm(pooled_output=pooled.float(), width=width, height=height,
                                           crop_w=0, crop_h=0, target_width=width, target_height=height,
                                           device=pooled.device, prompt_type="positive").float()

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


def _is_sdxl(model: Any) -> bool:
    import comfy.model_base

    # The SDXL BaseModel itself (its fine-tunes and distilled variants too): not the refiner
    # (another UNet and conditioning) nor instruct-pix2pix (8 input channels fed from an image).
    return type(model.model) is comfy.model_base.SDXL


def base_family(model: Any) -> str:
    """``"SD1.5"`` or ``"SDXL"`` for a ComfyUI MODEL the trainer can train an adapter for.

    SD1.5 means SD1.5's UNet layout (at any width: small test and mini-base UNets included); SDXL
    means ComfyUI's SDXL model (pooled text and size conditioning through ``encode_adm``) with a
    UNet the port rule covers, at any width.

    Raises:
        BaseModelError: another family, an SDXL variant the rule does not cover, or an
            inpainting model (named, with the fix).
    """
    from ..bps.ports import bps_problem
    from ..bps.unet_shape import SD15_SHAPE
    from ..nodes.base_check import describe_model, model_unet_shape

    try:
        shape = model_unet_shape(model)
    except ValueError as e:
        raise BaseModelError(f"{e}. BPS adapters are trained for {SUPPORTED_BASES}") from None
    sdxl = _is_sdxl(model)
    sd15 = not sdxl and shape.family_key == SD15_SHAPE.family_key
    if shape.in_channels != 4 and (sdxl or sd15):
        family = "SDXL" if sdxl else "SD1.5"
        raise BaseModelError(f"this is a {family} inpainting model ({shape.in_channels} input channels): train the "
                             f"adapter on the {family} base model instead; Apply BPS steers the inpainting model "
                             f"with it, since both have the same hidden states")
    if sd15:
        return "SD1.5"
    if sdxl:
        problem = bps_problem(shape)
        if problem:
            raise BaseModelError(f"this is {describe_model(model)}, {shape.describe()}, and {problem}: BPS cannot "
                                 f"train an adapter for it. Pass an SDXL checkpoint (or a fine-tune of it)")
        return "SDXL"
    raise BaseModelError(f"this checkpoint is {describe_model(model)}, {shape.describe()}: BPS adapters are trained "
                         f"for {SUPPORTED_BASES}. Pass such a checkpoint with --ckpt")


def prediction_type(model_sampling: Any) -> str:
    """``"eps"`` or ``"v"``: what a model with this ComfyUI ``model_sampling`` predicts.

    Raises:
        BaseModelError: another parameterisation (EDM, flow, ...), which the trainer does not train.
    """
    import comfy.model_sampling as ms

    discrete = isinstance(model_sampling, ms.ModelSamplingDiscrete)
    if discrete and isinstance(model_sampling, ms.V_PREDICTION) and not isinstance(model_sampling, ms.EDM):
        return "v"
    if discrete and isinstance(model_sampling, ms.EPS) and not isinstance(model_sampling, ms.V_PREDICTION):
        return "eps"
    # ComfyUI builds the class as ModelSampling(schedule, parameterisation): name both
    kinds = " + ".join(c.__name__ for c in type(model_sampling).__bases__)
    raise BaseModelError(f"the model samples with {kinds}: the BPS trainer trains on the 1000-step discrete "
                         f"schedule with epsilon or v-prediction (SD1.5, SDXL and their eps / v-pred fine-tunes), "
                         f"not EDM or flow models (e.g. Playground v2.5). Pass such a checkpoint with --ckpt")


def load_mini_base_models(path: Path) -> BaseModels | None:
    """The mini base (``train/mini_base``) with its weight-free VAE and text encoder, if ``path`` is
    one; None for any other file.

    ComfyUI's checkpoint loader cannot detect the mini base's small SD1.5 UNet, and the file holds
    no VAE or CLIP: the stand-ins take their place. It stays in float32 whatever --mixed-precision
    says (under 10M weights; its 16x16 latents would gain nothing from 16 bits).
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
                      vae=StandInVAE(), path=path, trained_size=recipe.get("image_size"))


def load_base_models(ckpt: str | Path, *, unet_dtype: torch.dtype, need_clip: bool = True,
                     need_vae: bool = True) -> BaseModels:
    """Load an SD1.5 or SDXL checkpoint through ComfyUI (or a mini base file, ``train/mini_base``) and freeze it.

    Raises:
        BaseModelError: missing file, undetectable model type, another family or prediction type.
    """
    import comfy.sd

    path = Path(ckpt)
    if not path.is_file():
        raise BaseModelError(f"checkpoint {path} does not exist; pass the SD1.5 or SDXL .safetensors/.ckpt "
                             f"file with --ckpt (e.g. ComfyUI/models/checkpoints/v1-5-pruned-emaonly.safetensors "
                             f"or sd_xl_base_1.0.safetensors)")
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
        raise BaseModelError(f"{path} holds no diffusion model; pass a full {SUPPORTED_BASES} checkpoint")
    try:
        family = base_family(model)
        prediction = prediction_type(model.get_model_object("model_sampling"))
    except BaseModelError as e:
        raise BaseModelError(f"{path}: {e}") from None
    if need_clip and clip is None:
        raise BaseModelError(f"{path} has no text encoder; pass a full {family} checkpoint (UNet, VAE, CLIP)")
    if need_vae and vae is None:
        raise BaseModelError(f"{path} has no VAE; pass a full {family} checkpoint (UNet, VAE, CLIP)")
    for p in model.model.parameters():
        p.requires_grad_(False)
    log.info("loaded %s: %s (%s-prediction), UNet weights %s, compute %s", path.name, family,
             "epsilon" if prediction == "eps" else "v", model.model.get_dtype(),
             model.model.manual_cast_dtype or model.model.get_dtype())
    return BaseModels(model=model, clip=clip, vae=vae, path=path)
