"""Weight-free stand-ins for the VAE and the text encoder of the mini base.

No SD1.5 weights can be downloaded here, so the mini base cannot use a real VAE or CLIP. These
stand-ins are deterministic, have no weights, and offer the methods the trainer and ComfyUI's
sampling code call on a ``comfy.sd.VAE`` / ``comfy.sd.CLIP``:

* :class:`StandInVAE`: an 8x8 area mean (128 px -> 16x16) followed by a fixed 3 -> 4 linear map;
  decoding applies the map's pseudo-inverse and upsamples bilinearly. What a decoded target loses
  (its edges blur over 8 px) sets the ceiling of every IoU measured on the mini base.
* :class:`StandInTextEncoder`: the mini base ignores text; every prompt encodes to the same
  all-zero context, so a caption cannot carry the sketch's information.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The stand-in VAE's spatial factor (that of SD's VAE).
FACTOR = 8
#: Fixed RGB (in [-1, 1]) -> 4-channel latent map: brightness, two colour differences and a fourth
#: row that mixes them, scaled so model-space latents (times SD1.5's 0.18215) span about [-1, 1].
RGB_TO_LATENT = torch.tensor([
    [0.40, 0.40, 0.40],
    [0.60, -0.30, -0.30],
    [0.00, 0.55, -0.55],
    [0.30, 0.30, -0.45],
], dtype=torch.float64)
#: SD1.5's latent scale (ComfyUI's latent_formats.SD15): the model multiplies raw latents by it.
SD15_SCALE = 0.18215


class StandInVAE:
    """8x8 area mean plus a fixed linear map, and its inverse; what ``comfy.sd.VAE`` offers the
    trainer and the evaluation (``encode``, ``decode``, ``vae_dtype``)."""

    vae_dtype = torch.float32
    downscale_ratio = FACTOR
    upscale_ratio = FACTOR
    latent_channels = 4

    def __init__(self) -> None:
        # raw latents are divided by the model's scale so that process_latent_in lands on the map
        self.encode_matrix = (RGB_TO_LATENT / SD15_SCALE).float()
        self.decode_matrix = torch.linalg.pinv(RGB_TO_LATENT / SD15_SCALE).float()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, 3)`` in [0, 1], sides multiples of 8 -> raw latents ``(B, 4, H/8, W/8)``."""
        if pixels.ndim != 4 or pixels.shape[-1] < 3 or pixels.shape[1] % FACTOR or pixels.shape[2] % FACTOR:
            raise ValueError(f"the stand-in VAE encodes (batch, height, width, 3) pixels with sides multiples of "
                             f"{FACTOR}, got {tuple(pixels.shape)}")
        x = pixels[..., :3].float().movedim(-1, 1) * 2 - 1
        x = F.avg_pool2d(x, FACTOR)
        return torch.einsum("lc,bchw->blhw", self.encode_matrix, x)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents ``(B, 4, h, w)`` -> pixels ``(B, 8h, 8w, 3)`` in [0, 1]."""
        x = torch.einsum("cl,blhw->bchw", self.decode_matrix, latents.float().cpu())
        x = F.interpolate(x, scale_factor=FACTOR, mode="bilinear", align_corners=False)
        return ((x + 1) / 2).clamp(0, 1).movedim(1, -1)


class StandInTextEncoder:
    """Every prompt -> the same all-zero context ``(1, 1, context_dim)``; what ``comfy.sd.CLIP``
    offers the trainer (``tokenize``, ``encode_from_tokens``)."""

    def __init__(self, context_dim: int):
        self.context_dim = int(context_dim)

    def tokenize(self, text: str) -> str:
        """The text itself: there is no vocabulary."""
        return text

    def encode_from_tokens(self, tokens: str) -> torch.Tensor:
        """The constant context, whatever the prompt."""
        return torch.zeros(1, 1, self.context_dim)

    def encode(self, text: str) -> torch.Tensor:
        """``encode_from_tokens(tokenize(text))``."""
        return self.encode_from_tokens(self.tokenize(text))
