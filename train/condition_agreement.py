"""How well a generated image agrees with the condition it was steered by (OpenCV, no torch).

* Sketch and edge conditions: :func:`edge_agreement` compares the edges of the condition with the
  edges of the image (both by Canny, so a white-on-black outline and a black-on-white one score
  alike): precision (image edges within ``tolerance`` pixels of a condition edge), recall
  (condition edges within ``tolerance`` of an image edge), their F-score, and the symmetric
  chamfer distance in pixels.
* Layout and segmentation conditions: :func:`region_agreement` asks whether the image keeps one
  colour per region of the layout: the share of the image's colour variance (CIELAB) explained by
  the layout's regions (eta squared: 1 when every region is flat, about 0 when the regions do not
  show in the image). The region colours of a segmentation map are class codes, not the colours
  to paint, so only consistency within regions is scored, not the colour itself.

Both are compared, in the evaluation, with the same score against another pair's condition
(chance level for that data) and with the base model alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: A layout colour counts as a region when it covers at least this share of the image; rarer
#: colours are the resize filter's blends along region borders and are left out.
MIN_REGION_SHARE = 0.005
#: Layout colours are binned per channel by this step before regions are found (resize blending).
COLOUR_STEP = 32


def default_tolerance(height: int, width: int) -> float:
    """Edge-matching tolerance in pixels: 1% of the image diagonal, at least 1.5 pixels."""
    return max(1.5, 0.01 * float(np.hypot(height, width)))


def edges(image: np.ndarray) -> np.ndarray:
    """Canny edges (bool ``H x W``) of a grey or RGB uint8 image, thresholds from its median
    (0.66 and 1.33 times it), after a 3x3 Gaussian blur."""
    grey = image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    grey = cv2.GaussianBlur(np.ascontiguousarray(grey), (3, 3), 0)
    median = float(np.median(grey))
    low, high = int(max(10, 0.66 * median)), int(max(30, min(255, 1.33 * median)))
    return cv2.Canny(grey, low, high) > 0


def _distance_to(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest True pixel of ``mask`` (inf without any)."""
    if not mask.any():
        return np.full(mask.shape, np.inf, np.float32)
    return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)


@dataclass(frozen=True)
class EdgeScore:
    """Edge agreement of an image with a condition (see the module docstring)."""

    precision: float
    recall: float
    f1: float
    chamfer: float  # pixels; inf when either side has no edges


def edge_agreement(condition: np.ndarray, image: np.ndarray, tolerance: float | None = None) -> EdgeScore:
    """Compare the Canny edges of ``condition`` (grey or RGB uint8) and ``image`` (RGB uint8), the
    same size (the condition is resized to the image if not)."""
    h, w = image.shape[:2]
    if condition.shape[:2] != (h, w):
        condition = cv2.resize(condition, (w, h), interpolation=cv2.INTER_AREA)
    tol = default_tolerance(h, w) if tolerance is None else float(tolerance)
    cond_edges, image_edges = edges(condition), edges(image)
    to_cond, to_image = _distance_to(cond_edges), _distance_to(image_edges)
    if not cond_edges.any() or not image_edges.any():
        return EdgeScore(0.0, 0.0, 0.0, float("inf"))
    d_image = to_cond[image_edges]   # each image edge pixel's distance to the condition's edges
    d_cond = to_image[cond_edges]
    precision, recall = float((d_image <= tol).mean()), float((d_cond <= tol).mean())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return EdgeScore(precision, recall, f1, float(0.5 * (d_image.mean() + d_cond.mean())))


def layout_regions(layout: np.ndarray) -> np.ndarray:
    """Region label per pixel (int32 ``H x W``, -1 for border blends) of an RGB (or grey) layout."""
    lay = layout if layout.ndim == 3 else layout[..., None]
    binned = (lay[..., :3].astype(np.int32) + COLOUR_STEP // 2) // COLOUR_STEP
    code = np.zeros(binned.shape[:2], np.int64)
    for c in range(binned.shape[2]):
        code = code * 64 + binned[..., c]
    values, inverse, counts = np.unique(code.reshape(-1), return_inverse=True, return_counts=True)
    keep = counts >= MIN_REGION_SHARE * code.size
    label_of = np.where(keep, np.cumsum(keep) - 1, -1)
    return label_of[inverse].reshape(code.shape).astype(np.int32)


def region_agreement(layout: np.ndarray, image: np.ndarray) -> float:
    """Share of the image's CIELAB colour variance explained by the layout's regions (0..1).

    ``layout`` is resized to the image (nearest neighbour) if needed. NaN when the layout has a
    single region (nothing to tell apart) or the image is flat.
    """
    h, w = image.shape[:2]
    if layout.shape[:2] != (h, w):
        layout = cv2.resize(layout, (w, h), interpolation=cv2.INTER_NEAREST)
    labels = layout_regions(layout)
    inside = labels >= 0
    if len(np.unique(labels[inside])) < 2:
        return float("nan")
    lab = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2LAB).astype(np.float64)
    pixels, lab_labels = lab[inside], labels[inside]
    total = ((pixels - pixels.mean(axis=0)) ** 2).sum()
    if total <= 1e-9:
        return float("nan")
    between = 0.0
    mean = pixels.mean(axis=0)
    for r in np.unique(lab_labels):
        members = pixels[lab_labels == r]
        between += len(members) * float(((members.mean(axis=0) - mean) ** 2).sum())
    return float(between / total)
