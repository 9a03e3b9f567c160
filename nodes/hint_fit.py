"""Fit condition images and masks to what B_phi and the UNet call need: channels, size, batch rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

import comfy.utils

from ..bps.errors import HintError
from .comfy_compat import window_frames

log = logging.getLogger("comfyui-bps")

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


@dataclass(frozen=True)
class RowLayout:
    """Which latent sample each row of one UNet call is, and whether it is an uncond (negative) row.

    ComfyUI batches [cond chunk, uncond chunk, ...], each chunk one full latent batch (or, under
    context windows, the window's frames), and lists the chunks' kinds in ``cond_or_uncond``
    (0 cond, 1 uncond), as ControlNet's ``broadcast_image_to`` assumes.
    """

    samples: Tensor      # (rows,) latent sample (frame) index of every row, in the whole latent batch
    latent_batch: int    # how many samples the whole latent batch has
    uncond: Tensor       # (rows,) bool: the row belongs to an uncond chunk


def row_layout(rows: int, transformer_options: dict) -> RowLayout:
    """The :class:`RowLayout` of a UNet call with ``rows`` rows and these ``transformer_options``."""
    kinds = list(transformer_options.get("cond_or_uncond", ()) or ())
    if not kinds or rows % len(kinds):
        kinds = [0]
    per_chunk = rows // len(kinds)
    windowed = window_frames(transformer_options, per_chunk)
    if windowed is not None:
        frames, latent_batch = torch.tensor(windowed[0]), windowed[1]
    else:
        frames, latent_batch = torch.arange(per_chunk), per_chunk
    uncond = torch.tensor([kind == 1 for kind in kinds]).repeat_interleave(per_chunk)
    return RowLayout(frames.repeat(len(kinds)), latent_batch, uncond)


def batch_index(layout: RowLayout, available: int, what: str, told: set | None = None) -> Tensor:
    """Which row of a hint/mask batch of ``available`` each UNet row uses, as core ControlNet does it.

    A batch of 1 is used for every sample; a batch of the latent batch's size gives one per sample
    (under context windows, each frame its own, by the window's frame indices). Any other size is
    cut or repeated to the latent batch the way ``comfy.controlnet.broadcast_image_to`` does: sample
    ``s`` takes row ``s % available`` (the first rows when there are more; cycled when fewer). That
    case logs one line, once per ``told`` set (the caller's, so one sampling run says it once).
    """
    if available == 1:
        return torch.zeros_like(layout.samples)
    if available != layout.latent_batch and (told is None or (what, available, layout.latent_batch) not in told):
        how = "uses its first" if available > layout.latent_batch else "repeats its"
        log.info("BPS: the %s has a batch of %d but the latent batch is %d: %s %s, as ComfyUI's ControlNet does",
                 what, available, layout.latent_batch, how,
                 f"{layout.latent_batch} rows" if available > layout.latent_batch else f"{available} rows in turn")
        if told is not None:
            told.add((what, available, layout.latent_batch))
    return layout.samples % available


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

