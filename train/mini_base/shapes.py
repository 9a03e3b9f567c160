"""The mini base's data: one random shape per picture, and its sketch.

A layout is one white shape (circle, square, triangle, diamond or star) at a random position,
size and rotation on black. The target image is the filled shape; the condition is its outline
(light strokes on black, like the trainer's demo set and the official sketch adapters). Position and
size vary enough that two independent layouts overlap little (mean IoU about 0.13, see
``mean_random_iou``), so a model that ignores the sketch cannot score well by chance. Shapes are
white because colour is what an outline does not carry: a base that must also invent a colour per
picture has more to learn in its short training, for a part of the picture no sketch can steer.

numpy + opencv only; every draw is seeded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

#: Picture side in pixels: 16x16 latents through the 8x stand-in VAE.
SIZE = 128
KINDS = ("circle", "square", "triangle", "diamond", "star")
#: Shape radius as a fraction of the side (a circle of radius 0.16 covers 8% of the picture).
RADIUS_RANGE = (0.16, 0.28)
#: Outline width in pixels at SIZE.
STROKE = 2
#: Every shape's colour.
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Layout:
    """One shape: kind, centre and radius as fractions of the side, rotation (radians), RGB 0..255."""

    kind: str
    cx: float
    cy: float
    radius: float
    angle: float
    color: tuple[int, int, int]

    @property
    def caption(self) -> str:
        """What the picture shows, in words (the stand-in text encoder ignores it)."""
        return f"a {self.kind} on black"


def random_layout(rng: np.random.Generator) -> Layout:
    """Draw one layout: uniform kind, radius in RADIUS_RANGE, centre anywhere the shape fits."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    r = float(rng.uniform(*RADIUS_RANGE))
    margin = r + 0.02
    cx, cy = (float(v) for v in rng.uniform(margin, 1 - margin, size=2))
    angle = float(rng.uniform(0, 2 * math.pi))
    return Layout(kind, cx, cy, r, angle, WHITE)


def random_layouts(seed: int, count: int) -> list[Layout]:
    """``count`` layouts from one seed (the same seed always gives the same list)."""
    rng = np.random.default_rng(seed)
    return [random_layout(rng) for _ in range(count)]


def _polygon(layout: Layout, size: int) -> np.ndarray:
    k, radii = {"square": (4, (1.0,)), "triangle": (3, (1.0,)), "diamond": (4, (1.0, 0.6)),
                "star": (10, (1.0, 0.45))}[layout.kind]
    cx, cy, r = layout.cx * size, layout.cy * size, layout.radius * size
    pts = [(cx + r * radii[j % len(radii)] * math.cos(layout.angle + 2 * math.pi * j / k),
            cy + r * radii[j % len(radii)] * math.sin(layout.angle + 2 * math.pi * j / k)) for j in range(k)]
    # 4 fractional bits: sub-pixel positions, so small moves change the picture smoothly
    return np.round(np.array(pts) * 16).astype(np.int32).reshape(-1, 1, 2)


def _draw(canvas: np.ndarray, layout: Layout, color, thickness: int) -> np.ndarray:
    size = canvas.shape[0]
    if layout.kind == "circle":
        center = (int(round(layout.cx * size * 16)), int(round(layout.cy * size * 16)))
        cv2.circle(canvas, center, int(round(layout.radius * size * 16)), color, thickness, cv2.LINE_AA, 4)
    elif thickness < 0:
        cv2.fillPoly(canvas, [_polygon(layout, size)], color, cv2.LINE_AA, 4)
    else:
        cv2.polylines(canvas, [_polygon(layout, size)], True, color, thickness, cv2.LINE_AA, 4)
    return canvas


def render_image(layout: Layout, size: int = SIZE) -> np.ndarray:
    """The target: the filled shape in its colour (white) on black, uint8 ``(size, size, 3)`` RGB."""
    return _draw(np.zeros((size, size, 3), np.uint8), layout, layout.color, -1)


def render_sketch(layout: Layout, size: int = SIZE) -> np.ndarray:
    """The condition: the shape's outline, white strokes on black, uint8 ``(size, size)``."""
    return _draw(np.zeros((size, size), np.uint8), layout, 255, max(1, round(STROKE * size / SIZE)))


def region_mask(layout: Layout, size: int = SIZE) -> np.ndarray:
    """Where the shape is: bool ``(size, size)`` (the filled shape, outline included)."""
    filled = _draw(np.zeros((size, size), np.uint8), layout, 255, -1)
    return filled >= 128


def shape_mask(image: np.ndarray) -> np.ndarray:
    """Where a picture (uint8 RGB or float RGB in [0, 1]) shows a shape: bool ``(H, W)``.

    Shapes are white on black: a pixel belongs to the shape where its mean brightness is over half.
    The mean of the three channels, not their maximum, so a coloured cast over the background (what
    a base that has not learnt the picture's mean colour draws) does not count as shape.
    """
    img = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    return img.mean(axis=-1) > 0.5


def write_pair_folder(folder: str | Path, layouts: list[Layout], size: int = SIZE) -> Path:
    """Write layouts as a training folder in the trainer's official layout (source/, target/,
    prompt.json), unchanged files left alone so the trainer's cache keys stay put."""
    folder = Path(folder)
    (folder / "source").mkdir(parents=True, exist_ok=True)
    (folder / "target").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, layout in enumerate(layouts):
        name = f"{i:04d}.png"
        for sub, img in (("source", render_sketch(layout, size)),
                         ("target", cv2.cvtColor(render_image(layout, size), cv2.COLOR_RGB2BGR))):
            ok, buf = cv2.imencode(".png", img)
            assert ok
            path = folder / sub / name
            if not path.is_file() or path.read_bytes() != buf.tobytes():
                path.write_bytes(buf.tobytes())
        lines.append(json.dumps({"source": f"source/{name}", "target": f"target/{name}", "prompt": layout.caption}))
    text = "\n".join(lines) + "\n"
    if not (folder / "prompt.json").is_file() or (folder / "prompt.json").read_text() != text:
        (folder / "prompt.json").write_text(text)
    return folder


def write_image_folder(folder: str | Path, layouts: list[Layout], size: int = SIZE) -> Path:
    """Write layouts as a folder of images alone (target/ and prompt.json naming only target and
    prompt, no source/): what ``train_bps.py --condition`` trains from."""
    folder = Path(folder)
    (folder / "target").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, layout in enumerate(layouts):
        name = f"{i:04d}.png"
        ok, buf = cv2.imencode(".png", cv2.cvtColor(render_image(layout, size), cv2.COLOR_RGB2BGR))
        assert ok
        path = folder / "target" / name
        if not path.is_file() or path.read_bytes() != buf.tobytes():
            path.write_bytes(buf.tobytes())
        lines.append(json.dumps({"target": f"target/{name}", "prompt": layout.caption}))
    text = "\n".join(lines) + "\n"
    if not (folder / "prompt.json").is_file() or (folder / "prompt.json").read_text() != text:
        (folder / "prompt.json").write_text(text)
    return folder


def mean_random_iou(seed: int = 0, count: int = 2000, size: int = SIZE) -> float:
    """Mean IoU of the regions of two independent layouts: what ignoring the sketch scores."""
    a, b = random_layouts(seed, count), random_layouts(seed + 1, count)
    ious = []
    for la, lb in zip(a, b):
        ma, mb = region_mask(la, size), region_mask(lb, size)
        ious.append((ma & mb).sum() / max(1, (ma | mb).sum()))
    return float(np.mean(ious))
