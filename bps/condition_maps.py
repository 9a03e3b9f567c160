"""Make a BPS condition from an image: sketch, edges, layout, gray or rgb.

One module for the trainer (which builds the conditions of a folder of images from the images
themselves) and the "BPS Condition from Image" node (which builds the condition of a photo at
sampling time), so an adapter is steered with exactly the kind of condition it learned from.
An adapter trained this way stores :meth:`ConditionSpec.to_dict` in its metadata.

Every preprocessor is deterministic (no random state, no threads racing) and resolution-aware:
sizes are given in pixels of a 512 x 512 image and scaled by ``sqrt(height * width) / 512``, so
the 512 and 1024 px versions of one picture give the same look, strokes as thick relative to
the picture.

* ``sketch``: light strokes on black, 1 channel. A difference of Gaussians (blur at ``sigma``
  minus blur at 1.6 ``sigma``) is positive on the dark side of every edge and along dark lines;
  responses above ``threshold`` become strokes, saturating over ``softness``. Photos give line
  drawings; drawings (dark lines on paper) give their lines, inverted.
* ``edges``: plain Canny edges, 1 channel {0, 1}: Gaussian blur ``sigma``, Sobel gradients
  rescaled to the 512-px reference (so ``low``/``high`` mean the same at any size), hysteresis
  ``low``/``high``, lines ``thickness`` pixels wide.
* ``layout``: flat colour regions, 3 channels: k-means with ``colors`` clusters in CIE Lab
  (from median-cut and farthest-first starts: no randomness) on a 256 x 256-area copy, median
  filtered; region borders smoothed over ``smooth`` pixels, each region painted its mean colour.
* ``gray``: luminance (ITU-R BT.601, as the trainer reads 1-channel condition images), 1 channel.
* ``rgb``: the image as is, 3 channels.

Inputs are ``(H, W)``, ``(H, W, 1|3|4)`` arrays, ``uint8``, ``uint16`` or float in [0, 1]
(alpha is composited onto black, as the trainer reads images). :func:`condition_image` returns
``uint8 (H, W, C)``: the trainer caches exactly that; :func:`condition_map` returns it as float32
in [0, 1] (``/ 255``). Pure numpy + OpenCV; no torch, no ComfyUI, no downloaded weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

import cv2
import numpy as np

from .errors import ConditionError

#: Side of the reference image the size parameters are given in (pixels of a 512 x 512 image).
REFERENCE_SIDE = 512
#: Version of the algorithms below. It enters the cache keys and the adapter metadata: change it
#: whenever a preprocessor's output changes for the same parameters.
ALGORITHM_VERSION = 1
#: Smallest blur of the sketch, in pixels (the 1.4 px of a 512-px image reaches it at 183 px).
_MIN_SKETCH_SIGMA = 0.5
#: Pixel count the layout's k-means works on (about 256 x 256, aspect kept).
_LAYOUT_WORK_AREA = 256 * 256
#: Lloyd iterations of the layout's k-means (a fixed count: the same work for every image).
_KMEANS_ITERATIONS = 12


# ------------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class SketchParams:
    """Parameters of ``sketch``.

    Attributes:
        sigma: blur of the finer Gaussian, in pixels of a 512-px image: the size of the smallest
            details drawn and about half the stroke width (0.3..20; default 1.4). Never less than
            half a pixel, so small images keep their lines.
        threshold: difference-of-Gaussians response (on [0, 1] luminance) below which nothing is
            drawn; raise it for fewer, stronger lines (0..0.5; default 0.005).
        softness: response above the threshold at which a stroke reaches full brightness; smaller
            gives harder, more binary strokes (0.001..1; default 0.015).
    """

    sigma: float = 1.4
    threshold: float = 0.005
    softness: float = 0.015

    def __post_init__(self) -> None:
        _in_range("sketch", "sigma", self.sigma, 0.3, 20.0)
        _in_range("sketch", "threshold", self.threshold, 0.0, 0.5)
        _in_range("sketch", "softness", self.softness, 0.001, 1.0)


@dataclass(frozen=True)
class EdgesParams:
    """Parameters of ``edges`` (Canny).

    Attributes:
        low: hysteresis low threshold on the gradient magnitude (Sobel of 0..255 values at the
            512-px reference); weaker pixels are never edges (1..2000; default 40).
        high: hysteresis high threshold; edges start only at stronger pixels (1..2000; default 80).
        sigma: Gaussian blur before the gradients, pixels of a 512-px image (0..20; default 1.0).
        thickness: line width, pixels of a 512-px image (1..20; default 1.0).
    """

    low: float = 40.0
    high: float = 80.0
    sigma: float = 1.0
    thickness: float = 1.0

    def __post_init__(self) -> None:
        _in_range("edges", "low", self.low, 1.0, 2000.0)
        _in_range("edges", "high", self.high, 1.0, 2000.0)
        _in_range("edges", "sigma", self.sigma, 0.0, 20.0)
        _in_range("edges", "thickness", self.thickness, 1.0, 20.0)
        if self.low > self.high:
            raise ConditionError(f"edges: low ({self.low:g}) must not exceed high ({self.high:g}); "
                                 f"swap them or lower low")


@dataclass(frozen=True)
class LayoutParams:
    """Parameters of ``layout``.

    Attributes:
        colors: number of flat colours (k-means clusters) (2..32; default 8).
        smooth: how far region borders are smoothed, pixels of a 512-px image; regions much
            thinner than this disappear into their neighbours (0..64; default 6).
    """

    colors: int = 8
    smooth: float = 6.0

    def __post_init__(self) -> None:
        _in_range("layout", "colors", self.colors, 2, 32)
        _in_range("layout", "smooth", self.smooth, 0.0, 64.0)


@dataclass(frozen=True)
class NoParams:
    """``gray`` and ``rgb`` take no parameters."""


def _in_range(kind: str, name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ConditionError(f"{kind}: {name} must be a number from {low:g} to {high:g}, got {value!r}")


# ----------------------------------------------------------------------------- image input

def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any supported image array as contiguous ``uint8 (H, W, 3)`` RGB.

    ``(H, W)`` and ``(H, W, 1)`` are grey; ``(H, W, 4)`` has its alpha composited onto black;
    float arrays are taken as [0, 1] (clipped, rounded to the nearest 8-bit level, so an image
    that came from 8 bits gets its exact levels back); ``uint16`` is scaled to 8 bits.

    Raises:
        ConditionError: not an image array (wrong rank or channels, empty, or an unsupported dtype).
    """
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ConditionError(f"an image must be (height, width) or (height, width, 1/3/4 channels), got shape "
                             f"{tuple(np.shape(image))}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ConditionError(f"the image is empty (shape {tuple(a.shape)})")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = (a // 257).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        a = np.rint(np.clip(np.nan_to_num(a.astype(np.float32), nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    else:
        raise ConditionError(f"image arrays must be uint8, uint16, bool or float in [0, 1], got {a.dtype}")
    if a.shape[2] == 4:
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        a = np.rint(a[:, :, :3].astype(np.float32) * alpha).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def _scale(height: int, width: int) -> float:
    """Size factor of an image against the 512 x 512 reference (by area, so any aspect works)."""
    return math.sqrt(height * width) / REFERENCE_SIDE


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    # An explicit odd kernel of +-4 sigma: OpenCV's automatic size depends on the dtype.
    k = 2 * int(math.ceil(4.0 * sigma)) + 1
    return cv2.GaussianBlur(img, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


# ------------------------------------------------------------------------------ preprocessors

def _sketch(rgb: np.ndarray, p: SketchParams) -> np.ndarray:
    gray = _luminance(rgb).astype(np.float32) / 255.0
    # Never below half a pixel: sub-pixel blurs differ by nothing, and small images would lose their lines.
    sigma = max(p.sigma * _scale(*gray.shape), _MIN_SKETCH_SIGMA)
    fine, coarse = _blur(gray, sigma), _blur(gray, 1.6 * sigma)
    response = coarse - fine  # > 0 on the dark side of an edge and along dark lines
    strokes = np.clip((response - p.threshold) / p.softness, 0.0, 1.0)
    return np.rint(strokes * 255.0).astype(np.uint8)[:, :, None]


def _edges(rgb: np.ndarray, p: EdgesParams) -> np.ndarray:
    gray = _luminance(rgb).astype(np.float32)
    s = _scale(*gray.shape)
    smooth = _blur(gray, p.sigma * s)
    # Central differences (no smoothing of their own, so the blur alone sets the scale), times 4 to
    # match a 3x3 Sobel on a ramp (8 x slope), times s: a blurred edge's slope falls as 1/size, so
    # this is the gradient the 512-px reference would have.
    gain = 4.0 * s
    dx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=1, borderType=cv2.BORDER_REFLECT) * gain
    dy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=1, borderType=cv2.BORDER_REFLECT) * gain
    lim = np.iinfo(np.int16).max
    dx = np.rint(np.clip(dx, -lim, lim)).astype(np.int16)
    dy = np.rint(np.clip(dy, -lim, lim)).astype(np.int16)
    edges = cv2.Canny(dx, dy, p.low, p.high, L2gradient=True)
    width = int(round(p.thickness * s))
    if width >= 2:
        edges = cv2.dilate(edges, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width)))
    return edges[:, :, None]


def _median_cut(lab: np.ndarray, k: int) -> np.ndarray:
    """k initial centres (k, 3) of ``lab`` (N, 3): split the box of colours with the largest spread
    at the median of its widest axis until there are k boxes; their means. No randomness, and a
    small change of the image moves the centres only a little."""
    boxes = [lab]
    while len(boxes) < k:
        spreads = [float(b.var(axis=0).max()) * len(b) if len(b) > 1 else -1.0 for b in boxes]
        i = int(np.argmax(spreads))
        if spreads[i] <= 0.0:  # fewer distinct colours than k
            break
        box = boxes.pop(i)
        axis = int(np.argmax(box.var(axis=0)))
        order = np.argsort(box[:, axis], kind="stable")
        half = len(box) // 2
        boxes += [box[order[:half]], box[order[half:]]]
    centres = np.stack([b.mean(axis=0) for b in boxes])
    return np.concatenate([centres, np.repeat(centres[-1:], k - len(centres), axis=0)])


def _farthest_first(lab: np.ndarray, k: int) -> np.ndarray:
    """k initial centres (k, 3): the colour nearest the mean, then again and again the colour
    farthest from every centre so far (k-means++ without the dice). Finds small, distinct regions
    that median cut folds into bigger ones."""
    first = int(((lab - lab.mean(axis=0)) ** 2).sum(axis=1).argmin())
    centres = [lab[first]]
    nearest = ((lab - centres[0]) ** 2).sum(axis=1)
    while len(centres) < k:
        far = int(nearest.argmax())
        if nearest[far] <= 0.0:  # fewer distinct colours than k
            centres.append(centres[-1])
            continue
        centres.append(lab[far])
        nearest = np.minimum(nearest, ((lab - lab[far]) ** 2).sum(axis=1))
    return np.stack(centres)


def _lloyd(lab: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, float]:
    """Labels (N,) and inertia (sum of squared distances) after a fixed number of Lloyd
    iterations from ``centres``. Clusters that empty keep their centre."""
    centres = centres.copy()
    k = len(centres)
    for _ in range(_KMEANS_ITERATIONS + 1):
        # Element-wise, channel by channel (no BLAS: its summation order may depend on threads)
        dist = (lab[:, 0:1] - centres[None, :, 0]) ** 2
        for c in (1, 2):
            dist += (lab[:, c:c + 1] - centres[None, :, c]) ** 2
        labels = dist.argmin(axis=1)
        counts = np.bincount(labels, minlength=k)
        for c in range(3):
            sums = np.bincount(labels, weights=lab[:, c], minlength=k)
            centres[:, c] = np.where(counts > 0, sums / np.maximum(counts, 1), centres[:, c])
    inertia = float(np.take_along_axis(dist, labels[:, None], axis=1).sum())
    return labels, inertia


def _kmeans_lab(lab: np.ndarray, k: int) -> np.ndarray:
    """Labels (N,) of ``lab`` (N, 3) float64: k-means from two deterministic starts (median cut,
    farthest first), keeping the tighter result. No random numbers anywhere."""
    runs = [_lloyd(lab, _median_cut(lab, k)), _lloyd(lab, _farthest_first(lab, k))]
    return min(runs, key=lambda run: run[1])[0]


def _layout(rgb: np.ndarray, p: LayoutParams) -> np.ndarray:
    h, w = rgb.shape[:2]
    f = min(1.0, math.sqrt(_LAYOUT_WORK_AREA / (h * w)))
    wh, ww = max(1, int(round(h * f))), max(1, int(round(w * f)))
    small = cv2.resize(rgb, (ww, wh), interpolation=cv2.INTER_AREA) if (wh, ww) != (h, w) else rgb
    # A median filter first: k-means then groups surfaces, not texture and noise, and (unlike a
    # blur) it makes no in-between colours along borders that would claim clusters of their own.
    work_scale = _scale(wh, ww)
    small_f = cv2.medianBlur(small, 3).astype(np.float32) / 255.0
    lab = cv2.cvtColor(small_f, cv2.COLOR_RGB2Lab).reshape(-1, 3).astype(np.float64)
    labels = _kmeans_lab(lab, p.colors)
    labels = labels.reshape(wh, ww)
    # Each region's colour: the mean RGB of its pixels in the (unblurred) working copy.
    flat = small.reshape(-1, 3).astype(np.float64)
    counts = np.bincount(labels.ravel(), minlength=p.colors)
    palette = np.stack([np.bincount(labels.ravel(), weights=flat[:, c], minlength=p.colors) for c in range(3)], 1)
    palette = np.rint(palette / np.maximum(counts, 1)[:, None]).clip(0, 255).astype(np.uint8)
    # Smooth borders: blur each region's indicator, bring it to full size, keep the strongest;
    # one label at a time so a large image never holds k full-size planes.
    sigma = p.smooth * work_scale
    best = np.full((h, w), -1.0, np.float32)
    label = np.zeros((h, w), np.int64)
    for c in range(p.colors):
        if counts[c] == 0:
            continue
        plane = _blur((labels == c).astype(np.float32), sigma)
        if (wh, ww) != (h, w):
            plane = cv2.resize(plane, (w, h), interpolation=cv2.INTER_LINEAR)
        better = plane > best  # strict: ties keep the lower label, whatever the order of equal planes
        best[better] = plane[better]
        label[better] = c
    return palette[label]


def _gray(rgb: np.ndarray, p: NoParams) -> np.ndarray:
    return _luminance(rgb)[:, :, None]


def _rgb(rgb: np.ndarray, p: NoParams) -> np.ndarray:
    return rgb


@dataclass(frozen=True)
class Preprocessor:
    """One kind of condition: its parameter class, function, channel count and description."""

    kind: str
    params: type
    run: Callable[[np.ndarray, Any], np.ndarray]
    channels: int
    meaning: str       # the adapter's hint_meaning for conditions of this kind
    summary: str


PREPROCESSORS: dict[str, Preprocessor] = {p.kind: p for p in (
    Preprocessor("sketch", SketchParams, _sketch, 1, "sketch",
                 "line drawing: light strokes on black (difference of Gaussians)"),
    Preprocessor("edges", EdgesParams, _edges, 1, "edges", "Canny edges: thin white lines on black"),
    Preprocessor("layout", LayoutParams, _layout, 3, "layout", "flat colour regions (k-means in Lab)"),
    Preprocessor("gray", NoParams, _gray, 1, "grayscale", "luminance, unchanged otherwise"),
    Preprocessor("rgb", NoParams, _rgb, 3, "image", "the image itself"),
)}
#: The condition kinds, in menu order.
KINDS: tuple[str, ...] = tuple(PREPROCESSORS)


def parameter_help(kind: str) -> str:
    """``name=default`` of every parameter of ``kind``, for messages and tooltips."""
    names = [f"{f.name}={f.default:g}" for f in fields(PREPROCESSORS[kind].params)]
    return ", ".join(names) if names else "none"


# ------------------------------------------------------------------------------------- spec

@dataclass(frozen=True)
class ConditionSpec:
    """A preprocessor and its parameters: what the trainer records and the node reproduces.

    Attributes:
        kind: one of :data:`KINDS`.
        params: that kind's parameter dataclass (defaults when built with :meth:`make`).
    """

    kind: str
    params: Any

    def __post_init__(self) -> None:
        if self.kind not in PREPROCESSORS:
            raise ConditionError(f"unknown condition {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not isinstance(self.params, PREPROCESSORS[self.kind].params):
            raise ConditionError(f"{self.kind} takes {PREPROCESSORS[self.kind].params.__name__}, got "
                                 f"{type(self.params).__name__}")

    @classmethod
    def make(cls, kind: str, overrides: Mapping[str, Any] | None = None) -> "ConditionSpec":
        """``kind`` with default parameters, changed by ``overrides`` (values may be text, as
        given on a command line or in a node's text box).

        Raises:
            ConditionError: an unknown kind, an unknown parameter or a value out of range
                (the message lists the kind's parameters and their defaults).
        """
        if kind not in PREPROCESSORS:
            raise ConditionError(f"unknown condition {kind!r}; choose one of {', '.join(KINDS)}")
        cls_ = PREPROCESSORS[kind].params
        types = {f.name: type(f.default) for f in fields(cls_)}
        values = {}
        for name, value in (overrides or {}).items():
            if name not in types:
                raise ConditionError(f"{kind} has no parameter {name!r}; its parameters are {parameter_help(kind)}")
            values[name] = _convert(kind, name, value, types[name])
        return cls(kind, cls_(**values))

    @property
    def channels(self) -> int:
        """Channels of the condition: 1 (sketch, edges, gray) or 3 (layout, rgb)."""
        return PREPROCESSORS[self.kind].channels

    @property
    def meaning(self) -> str:
        """The hint meaning an adapter trained on these conditions records."""
        return PREPROCESSORS[self.kind].meaning

    def to_dict(self) -> dict[str, Any]:
        """``{"kind", "params", "version"}``: JSON-ready, for adapter metadata and cache keys."""
        return {"kind": self.kind, "params": dataclasses.asdict(self.params), "version": ALGORITHM_VERSION}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal specs give equal text."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> "ConditionSpec":
        """The spec :meth:`to_dict` wrote (e.g. read back from an adapter's metadata).

        Raises:
            ConditionError: not such a dict, or its kind or parameters are unknown or invalid.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("kind"), str) \
                or not isinstance(data.get("params", {}), Mapping):
            raise ConditionError(f"a condition is a JSON object with 'kind' and 'params', got {data!r}")
        return cls.make(data["kind"], data.get("params", {}))

    def apply(self, image: np.ndarray) -> np.ndarray:
        """:func:`condition_image` of ``image`` with this spec (``uint8 (H, W, channels)``)."""
        return condition_image(image, self)

    def describe(self) -> str:
        """E.g. ``sketch(sigma=1.4, threshold=0.005, softness=0.015)``, for logs."""
        args = ", ".join(f"{k}={v:g}" for k, v in dataclasses.asdict(self.params).items())
        return f"{self.kind}({args})"


def _convert(kind: str, name: str, value: Any, want: type) -> Any:
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            raise ConditionError(f"{kind}: {name} must be a number, got {text!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConditionError(f"{kind}: {name} must be a number, got {value!r}")
    if want is int:
        if not float(value).is_integer():
            raise ConditionError(f"{kind}: {name} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def parse_overrides(items: str | list[str] | tuple[str, ...]) -> dict[str, str]:
    """``"key=value"`` items (a list, or one text separated by commas, spaces or newlines) as a dict.

    Raises:
        ConditionError: an item without ``=`` or a key given twice.
    """
    if isinstance(items, str):
        items = items.replace(",", " ").split()
    out: dict[str, str] = {}
    for item in items:
        for part in item.replace(",", " ").split():
            key, eq, value = part.partition("=")
            if not eq or not key.strip() or not value.strip():
                raise ConditionError(f"condition parameters are key=value, e.g. sigma=2; got {part!r}")
            if key.strip() in out:
                raise ConditionError(f"condition parameter {key.strip()!r} is given twice")
            out[key.strip()] = value.strip()
    return out


# ------------------------------------------------------------------------------------- run

def condition_image(image: np.ndarray, spec: ConditionSpec) -> np.ndarray:
    """The condition of ``image`` as ``uint8 (H, W, spec.channels)``, the image's size.

    Raises:
        ConditionError: ``image`` is not a supported image array.
    """
    rgb = to_rgb_uint8(image)
    out = PREPROCESSORS[spec.kind].run(rgb, spec.params)
    assert out.dtype == np.uint8 and out.shape == (*rgb.shape[:2], spec.channels), (out.dtype, out.shape)
    return np.ascontiguousarray(out)


def condition_map(image: np.ndarray, spec: ConditionSpec) -> np.ndarray:
    """The condition of ``image`` as float32 ``(H, W, spec.channels)`` in [0, 1]: exactly
    :func:`condition_image` / 255, the values the trainer feeds B_phi."""
    return condition_image(image, spec).astype(np.float32) / np.float32(255.0)
