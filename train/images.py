"""Read training images and bring them to the training size (opencv + numpy only).

Kept free of torch and ComfyUI so the data checks run before anything heavy is imported.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

#: File endings the trainer reads as images.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded."""


def read_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Decode an image file to ``uint8`` ``(H, W, channels)``: RGB for 3, luminance for 1.

    Alpha is composited onto black (sketch convention: white strokes on black); 16-bit images
    are scaled to 8 bit.

    Raises:
        ImageReadError: the file is empty, truncated or not an image.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    data = np.fromfile(str(path), dtype=np.uint8)  # not cv2.imread: it fails on non-ASCII paths
    if data.size == 0:
        raise ImageReadError(f"{path}: file is empty")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageReadError(f"{path}: not a readable image (corrupt or unsupported format)")
    if img.dtype == np.uint16:
        img = (img // 257).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        img = (img[:, :, :3].astype(np.float32) * alpha).round().astype(np.uint8)
    if img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return to_channels(img, channels)


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Convert ``(H, W, 1|3)`` uint8 to the requested channel count (1 = luminance)."""
    have = img.shape[2]
    if have == channels:
        return img
    if channels == 1:
        return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None]
    if channels == 3 and have == 1:
        return np.repeat(img, 3, axis=2)
    raise ValueError(f"cannot convert a {have}-channel image to {channels} channels; use 1 or 3")


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file (decodes it: this is also the corruption check)."""
    img = read_image(path, 3)
    return img.shape[0], img.shape[1]


def training_size(height: int, width: int, resolution: int, multiple: int = 64) -> tuple[int, int]:
    """Training ``(height, width)``: the image's aspect ratio, about ``resolution**2`` pixels,
    both sides multiples of ``multiple`` (64 keeps every UNet level's size even)."""
    if resolution % multiple:
        raise ValueError(f"--resolution must be a multiple of {multiple}, got {resolution}")
    scale = math.sqrt(resolution * resolution / (height * width))
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    return h, w


def fit_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``img`` to cover ``size`` (h, w) keeping its aspect ratio, then centre-crop.

    Area interpolation when shrinking (keeps thin sketch lines), cubic when enlarging.
    """
    th, tw = size
    h, w = img.shape[:2]
    scale = max(th / h, tw / w)
    nh, nw = max(th, int(math.ceil(h * scale - 1e-6))), max(tw, int(math.ceil(w * scale - 1e-6)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    channels = img.shape[2]
    out = cv2.resize(img, (nw, nh), interpolation=interp)
    if out.ndim == 2:
        out = out[:, :, None]
    top, left = (nh - th) // 2, (nw - tw) // 2
    out = out[top:top + th, left:left + tw]
    assert out.shape == (th, tw, channels)
    return np.ascontiguousarray(out)
