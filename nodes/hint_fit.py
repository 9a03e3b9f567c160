"""Fit condition images and masks to what B_phi and the UNet call need: channels, size, batch rows."""

from __future__ import annotations

import torch
from torch import Tensor

import comfy.utils

from ..bps.errors import HintError

#: RGB -> luminance weights (ITU-R BT.601, as cv2.COLOR_RGB2GRAY, which the trainer uses).
LUMA = (0.299, 0.587, 0.114)


def prepare_hint_channels(hint: Tensor, channels: int, extra_channels: int = 0) -> Tensor:
    """Match a ``(B, C, H, W)`` image in [0, 1] to the adapter's channel layout.

    RGB becomes one channel by luminance for 1-channel adapters (grey RGB, three equal channels, by
    taking one of them: the same value, bit for bit); one channel is repeated for
    3-channel adapters; an alpha channel is dropped. An image that already has
    ``channels + extra_channels`` channels (a style adapter's RGB plus extra map, packed) is kept.

    Raises:
        HintError: the image is not 4-D or its channels cannot be matched.
    """
    if hint.ndim != 4:
        raise HintError(f"the condition image must be (batch, channels, height, width), got {tuple(hint.shape)}")
    c = hint.shape[1]
    if c == channels or (extra_channels and c == channels + extra_channels):
        return hint
    if extra_channels:
        raise HintError(f"this style adapter takes {channels} image channel(s) plus {extra_channels} extra map "
                        f"channel(s) packed together ({channels + extra_channels} in all), got {c}. Build the "
                        f"hint with the BPS Hint Preprocessor node and its extra_map input")
    if c == 4:
        hint, c = hint[:, :3], 3
    if c == 3 and channels == 1:
        if torch.equal(hint[:, 0], hint[:, 1]) and torch.equal(hint[:, 0], hint[:, 2]):
            # Grey shown as RGB (BPS Condition from Image, any grey picture) is its own luminance: the
            # channel itself is exactly what the trainer fed B_phi; the weighted sum can be 1 ulp off.
            return hint[:, :1]
        weights = torch.tensor(LUMA, dtype=hint.dtype, device=hint.device).view(1, 3, 1, 1)
        return (hint * weights).sum(dim=1, keepdim=True)
    if c == 1 and channels == 3:
        return hint.expand(-1, 3, -1, -1)
    if c == 3 and channels == 3:
        return hint
    raise HintError(f"the condition image has {c} channels; this adapter takes {channels}. Use a grayscale or RGB "
                    f"image")


def fit_image(image: Tensor, height: int, width: int) -> Tensor:
    """Centre-crop ``(B, C, H, W)`` to the aspect ratio of ``height x width`` and resize to it.

    Like ComfyUI's ControlNet hint handling (``common_upscale(..., "center")``); the filter is the
    trainer's: area averaging when shrinking (thin strokes stay visible), bicubic when enlarging.
    """
    if tuple(image.shape[-2:]) == (height, width):
        return image
    shrink = image.shape[-2] >= height and image.shape[-1] >= width
    out = comfy.utils.common_upscale(image, width, height, "area" if shrink else "bicubic", "center")
    return out if shrink else out.clamp(0.0, 1.0)


def row_samples(rows: int, transformer_options: dict) -> Tensor:
    """Latent sample index of every row of a UNet call.

    ComfyUI batches [cond chunk, uncond chunk, ...], each chunk one full latent batch, and lists the
    chunks in ``cond_or_uncond`` (as ControlNet's broadcast_image_to assumes).
    """
    chunks = len(transformer_options.get("cond_or_uncond", ()) or ()) or 1
    if rows % chunks:
        chunks = 1
    return torch.arange(rows) % (rows // chunks)


def batch_index(samples: Tensor, available: int, what: str) -> Tensor:
    """Which row of a hint/mask batch each sample uses: a batch of 1 is broadcast, else one per sample."""
    if available == 1:
        return torch.zeros_like(samples)
    latent_batch = int(samples.max()) + 1
    if available != latent_batch:
        raise HintError(f"the {what} has a batch of {available} but the latent batch is {latent_batch}: give one "
                        f"{what} for all samples or exactly one per sample (e.g. match the Empty Latent Image "
                        f"batch_size)")
    return samples


def as_mask(mask: Tensor | None) -> Tensor | None:
    """A MASK as ``(B, 1, H, W)`` float in [0, 1]."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise HintError(f"the mask must be (height, width) or (batch, height, width), got {tuple(mask.shape)}")
    return mask.float().clamp(0.0, 1.0).unsqueeze(1)

