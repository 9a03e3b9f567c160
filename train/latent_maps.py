"""Read the condition maps of 24-channel adapters (the official style2 configuration): ``.npy``
arrays at latent resolution, and bring them to the training size (numpy + opencv only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .images import fit_image


class MapReadError(ValueError):
    """A condition map file exists but is not a usable array."""


def read_map(path: str | Path, channels: int) -> np.ndarray:
    """Load a ``.npy`` map as float32 ``(h, w, channels)``.

    The array may be ``(channels, h, w)`` or ``(h, w, channels)``, float (used as is) or uint8
    (scaled to [0, 1]); it is never unpickled.

    Raises:
        MapReadError: not a .npy array, wrong shape or dtype, or NaN/infinite values.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    try:
        arr = np.load(str(path), allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise MapReadError(f"{path}: not a readable .npy array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 3 or channels not in (arr.shape[0], arr.shape[2]):
        shape = getattr(arr, "shape", None)
        raise MapReadError(f"{path}: array of shape {shape}, expected ({channels}, h, w) or (h, w, {channels})")
    if arr.shape[2] != channels:
        arr = np.moveaxis(arr, 0, -1)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    else:
        raise MapReadError(f"{path}: array of dtype {arr.dtype}; use float32 (or uint8, read as /255)")
    if not np.isfinite(arr).all():
        raise MapReadError(f"{path}: the array contains NaN or infinite values")
    return np.ascontiguousarray(arr)


def map_size(path: str | Path, channels: int) -> tuple[int, int]:
    """``(h, w)`` of a map file (reads it: this is also the corruption check)."""
    arr = read_map(path, channels)
    return arr.shape[0], arr.shape[1]


def fit_map(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a ``(h, w, C)`` map to cover ``size`` and centre-crop it, as the target image is fitted."""
    return fit_image(arr, size)
