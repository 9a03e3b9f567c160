"""The built-in demo set: 40 sketch -> image pairs the trainer draws itself.

Each pair is a simple shape: the condition is its white outline on black (a 1-channel sketch,
like the official sketch adapters take), the target the same shape filled with a colour on a
plain background, and the caption says which ("a red triangle on a light gray background").
Drawn deterministically, so the files (and the latent cache keyed on their content) are the same
on every run. Written in the official layout (source/, target/, prompt.json) so the demo also
shows what a training folder looks like.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

NUM_PAIRS = 40
SIZE = 512

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS = {  # name -> RGB
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
    "purple": (140, 60, 190), "orange": (240, 130, 30), "pink": (235, 120, 170), "teal": (30, 160, 160),
}
BACKGROUNDS = {"white": (250, 250, 250), "light gray": (200, 200, 200), "light blue": (190, 215, 240),
               "beige": (235, 225, 200)}


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    if shape == "square":
        k, radii = 4, [r] * 4
        angle += math.pi / 4
    elif shape == "triangle":
        k, radii = 3, [r] * 3
        angle -= math.pi / 2
    elif shape == "diamond":
        k, radii = 4, [r, 0.7 * r] * 2
    elif shape == "star":
        k, radii = 10, [r, 0.45 * r] * 5
        angle -= math.pi / 2
    else:
        raise ValueError(shape)
    pts = [(cx + rr * math.cos(angle + 2 * math.pi * j / k), cy + rr * math.sin(angle + 2 * math.pi * j / k))
           for j, rr in enumerate(radii)]
    return np.round(np.array(pts)).astype(np.int32).reshape(-1, 1, 2)


def draw_pair(index: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, str]:
    """Pair ``index``: (sketch ``(size, size)`` uint8, image ``(size, size, 3)`` uint8 RGB, caption)."""
    rng = np.random.default_rng(1000 + index)
    shape = SHAPES[index % len(SHAPES)]
    color_name = list(COLORS)[(index // len(SHAPES)) % len(COLORS)]
    bg_name = list(BACKGROUNDS)[(index * 3 + index // len(SHAPES)) % len(BACKGROUNDS)]
    r = size * rng.uniform(0.2, 0.32)
    cx, cy = size * rng.uniform(0.35, 0.65), size * rng.uniform(0.35, 0.65)
    angle = rng.uniform(-0.3, 0.3)
    line = max(2, size // 80)

    sketch = np.zeros((size, size), np.uint8)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUNDS[bg_name]
    color = COLORS[color_name]
    if shape == "circle":
        center, radius = (int(round(cx)), int(round(cy))), int(round(r))
        cv2.circle(image, center, radius, color, -1, cv2.LINE_AA)
        cv2.circle(sketch, center, radius, 255, line, cv2.LINE_AA)
    else:
        poly = _polygon(shape, cx, cy, r, angle)
        cv2.fillPoly(image, [poly], color, cv2.LINE_AA)
        cv2.polylines(sketch, [poly], True, 255, line, cv2.LINE_AA)
    caption = f"a {color_name} {shape} on a {bg_name} background"
    return sketch, image, caption


def write_demo_set(folder: str | Path, num_pairs: int = NUM_PAIRS, size: int = SIZE) -> Path:
    """Write the demo pairs to ``folder`` (source/, target/, prompt.json) and return the folder.

    Existing files with the same content are left untouched, so re-running is cheap.
    """
    folder = Path(folder)
    (folder / "source").mkdir(parents=True, exist_ok=True)
    (folder / "target").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num_pairs):
        sketch, image, caption = draw_pair(i, size)
        name = f"{i:03d}.png"
        for sub, img in (("source", sketch), ("target", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))):
            ok, buf = cv2.imencode(".png", img)
            assert ok
            path = folder / sub / name
            if not path.is_file() or path.read_bytes() != buf.tobytes():
                path.write_bytes(buf.tobytes())
        lines.append(json.dumps({"source": f"source/{name}", "target": f"target/{name}", "prompt": caption}))
    text = "\n".join(lines) + "\n"
    json_path = folder / "prompt.json"
    if not json_path.is_file() or json_path.read_text() != text:
        json_path.write_text(text)
    return folder
