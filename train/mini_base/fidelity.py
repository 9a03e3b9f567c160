"""Condition fidelity of generated shapes: IoU and centroid error against the condition's region.

numpy only. A generated picture's shape is where it is bright (``shapes.shape_mask``); the
condition's region is the filled shape its sketch outlines (``shapes.region_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """(y, x) mean position of a bool mask in pixels, or None when it is empty."""
    ys, xs = np.nonzero(mask)
    return (float(ys.mean()), float(xs.mean())) if ys.size else None


def centroid_error(generated: np.ndarray, region: np.ndarray) -> float | None:
    """Distance between the two centroids as a fraction of the picture's side; None when the
    generated mask is empty (no shape to place)."""
    a, b = centroid(generated), centroid(region)
    if a is None or b is None:
        return None
    return float(np.hypot(a[0] - b[0], a[1] - b[1]) / generated.shape[0])


@dataclass(frozen=True)
class Fidelity:
    """Mean IoU and centroid error of a set of samples against their regions.

    Attributes:
        iou: mean IoU over all samples (an empty sample scores 0).
        iou_std: its standard deviation over samples.
        centroid: mean centroid error (fraction of the side) over the samples that show a shape.
        empty: fraction of samples that show no shape at all.
        count: number of samples.
    """

    iou: float
    iou_std: float
    centroid: float
    empty: float
    count: int

    @staticmethod
    def of(generated: list[np.ndarray], regions: list[np.ndarray]) -> "Fidelity":
        """Score generated masks against their regions, pairwise."""
        if len(generated) != len(regions) or not generated:
            raise ValueError(f"need as many regions as generated masks (>0), got {len(regions)} and {len(generated)}")
        ious = np.array([iou(g, r) for g, r in zip(generated, regions)])
        errors = [centroid_error(g, r) for g, r in zip(generated, regions)]
        placed = [e for e in errors if e is not None]
        return Fidelity(float(ious.mean()), float(ious.std()), float(np.mean(placed)) if placed else float("nan"),
                        1 - len(placed) / len(errors), len(ious))

    def to_dict(self) -> dict[str, float]:
        """JSON-ready."""
        return {"iou": self.iou, "iou_std": self.iou_std, "centroid_error": self.centroid, "empty": self.empty,
                "count": self.count}
