"""A labelled picture grid: one row per pair, condition | target | one column per sampled variant."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np

#: Cells smaller than this (pixels per side) are enlarged (nearest neighbour) so labels fit.
MIN_CELL = 128
HEADER = 26


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def _cell(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if image.shape[:2] == (h, w):
        return _rgb(image)
    return _rgb(cv2.resize(image, (w, h), interpolation=cv2.INTER_NEAREST))


def comparison_grid(conditions: Sequence[np.ndarray], targets: Sequence[np.ndarray] | None,
                    columns: Mapping[str, Sequence[np.ndarray]]) -> np.ndarray:
    """The grid as an RGB uint8 array; every image is uint8 (grey or RGB); each column of
    ``columns`` holds one image per row. Column labels are drawn in a header row."""
    rows = len(conditions)
    if any(len(images) != rows for images in columns.values()) or (targets is not None and len(targets) != rows):
        raise ValueError("every column of the grid needs one image per condition")
    first = next(iter(columns.values()))[0] if columns else conditions[0]
    h, w = first.shape[:2]
    scale = max(1, -(-MIN_CELL // min(h, w)))
    size = (h * scale, w * scale)
    labels = ["condition"] + (["target"] if targets is not None else []) + list(columns)
    grid = np.full((HEADER + rows * (size[0] + 2), len(labels) * (size[1] + 2), 3), 255, np.uint8)
    for c, label in enumerate(labels):
        cv2.putText(grid, label, (c * (size[1] + 2) + 4, HEADER - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    for r in range(rows):
        cells = [conditions[r]] + ([targets[r]] if targets is not None else []) + [col[r] for col in columns.values()]
        y = HEADER + r * (size[0] + 2)
        for c, image in enumerate(cells):
            x = c * (size[1] + 2)
            grid[y:y + size[0], x:x + size[1]] = _cell(image, size)
    return grid


def save_comparison_grid(path: str | Path, conditions: Sequence[np.ndarray], targets: Sequence[np.ndarray] | None,
                         columns: Mapping[str, Sequence[np.ndarray]]) -> Path:
    """Write :func:`comparison_grid` as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = comparison_grid(conditions, targets, columns)
    if not cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path
