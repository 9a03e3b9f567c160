"""Draw the example images the example workflows load: a line sketch, a colour layout and a photo.

    python tools/draw_example_inputs.py    # writes example_inputs/bps_example_{sketch,layout,photo}.png

All show the same scene (a cabin by a lake, pines, mountains, the sun) on one 512x512 grid, so the
sketch and the layout agree where ``BPS Sketch and Layout`` stacks them. The photo is a shaded
render of the scene (sky gradient and sun glow, textured rock, grass, water and wood, soft edges)
for ``BPS Photo to Sketch to Image``, whose BPS Condition from Image node makes the sketch. Drawn
from code with a seeded generator, not downloaded, so anyone can regenerate them bit for bit
(tests/test_example_files.py checks that).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

SIZE = 512
OUT = Path(__file__).resolve().parents[1] / "example_inputs"
SKETCH_NAME = "bps_example_sketch.png"
LAYOUT_NAME = "bps_example_layout.png"
PHOTO_NAME = "bps_example_photo.png"
#: Seed of the photo's textures (numpy's PCG64: the same numbers on every platform).
PHOTO_SEED = 19

# The scene, in pixels of the 512x512 canvas: each shape is drawn as a filled region in the layout
# and as its outline in the sketch.
HORIZON = 300                      # where the grass meets the mountains
MOUNTAINS = [(0, 230), (90, 150), (170, 215), (260, 120), (360, 210), (430, 170), (512, 225)]
LAKE = ((150, 420), (150, 55))     # centre, half axes of the ellipse
CABIN = (300, 250, 440, 340)       # x0, y0, x1, y1 of the walls
ROOF = [(285, 252), (370, 185), (455, 252)]
DOOR = (355, 285, 385, 340)
WINDOW = (315, 270, 345, 300)
CHIMNEY = (405, 190, 425, 230)
PINES = [(60, 330, 40, 110), (470, 360, 30, 90)]   # x, base y, half width, height
SUN = ((420, 70), 35)

# Flat colours of the layout (RGB), one per kind of region, as a segmentation-style map.
COLOURS = {
    "sky": (135, 196, 235), "mountain": (120, 130, 150), "grass": (110, 170, 80),
    "lake": (40, 100, 190), "wall": (150, 100, 60), "roof": (160, 50, 40), "door": (80, 50, 30),
    "window": (250, 220, 120), "pine": (30, 90, 50), "sun": (250, 200, 60),
}


def _pine(x: int, base: int, half: int, height: int) -> np.ndarray:
    return np.array([(x - half, base), (x, base - height), (x + half, base)], np.int32)


def _mountain_polygon() -> np.ndarray:
    return np.array(MOUNTAINS + [(SIZE, HORIZON), (0, HORIZON)], np.int32)


def draw_sketch() -> np.ndarray:
    """Black strokes on white, 8-bit grey: what a user draws (BPS Hint Preprocessor can invert it)."""
    img = np.full((SIZE, SIZE), 255, np.uint8)
    ink, width, aa = 0, 4, cv2.LINE_AA
    cv2.polylines(img, [np.array(MOUNTAINS, np.int32)], False, ink, width, aa)
    cv2.line(img, (0, HORIZON), (SIZE, HORIZON), ink, 3, aa)
    cv2.ellipse(img, LAKE[0], LAKE[1], 0, 0, 360, ink, width, aa)
    for dx, dy, length in ((-60, -10, 50), (10, 15, 60), (-20, 35, 40)):   # ripples
        x, y = LAKE[0][0] + dx, LAKE[0][1] + dy
        cv2.line(img, (x, y), (x + length, y), ink, 2, aa)
    # Paper white inside the near objects, so the far lines (mountains, horizon) stop at their edges.
    cv2.fillPoly(img, [np.array(ROOF, np.int32)] + [_pine(*pine) for pine in PINES], 255)
    for x0, y0, x1, y1 in (CABIN, CHIMNEY):
        cv2.rectangle(img, (x0, y0), (x1, y1), 255, -1)
    cv2.rectangle(img, CABIN[:2], CABIN[2:], ink, width, aa)
    cv2.polylines(img, [np.array(ROOF, np.int32)], True, ink, width, aa)
    for x0, y0, x1, y1 in (DOOR, WINDOW, CHIMNEY):
        cv2.rectangle(img, (x0, y0), (x1, y1), ink, 3, aa)
    cv2.line(img, (WINDOW[0], 285), (WINDOW[2], 285), ink, 2, aa)
    cv2.line(img, (330, WINDOW[1]), (330, WINDOW[3]), ink, 2, aa)
    for pine in PINES:
        cv2.polylines(img, [_pine(*pine)], True, ink, width, aa)
        x, base = pine[0], pine[1]
        cv2.line(img, (x, base), (x, base + 25), ink, width, aa)
    cv2.circle(img, SUN[0], SUN[1], ink, width, aa)
    return img


def draw_layout() -> np.ndarray:
    """Flat colour regions (RGB), no anti-aliasing: each colour is one kind of region."""
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    c = COLOURS
    img[:] = c["sky"]
    img[HORIZON:] = c["grass"]
    cv2.fillPoly(img, [_mountain_polygon()], c["mountain"])
    cv2.circle(img, SUN[0], SUN[1], c["sun"], -1)
    cv2.ellipse(img, LAKE[0], LAKE[1], 0, 0, 360, c["lake"], -1)
    cv2.rectangle(img, CABIN[:2], CABIN[2:], c["wall"], -1)
    cv2.fillPoly(img, [np.array(ROOF, np.int32)], c["roof"])
    cv2.rectangle(img, CHIMNEY[:2], CHIMNEY[2:], c["roof"], -1)
    cv2.rectangle(img, DOOR[:2], DOOR[2:], c["door"], -1)
    cv2.rectangle(img, WINDOW[:2], WINDOW[2:], c["window"], -1)
    for pine in PINES:
        cv2.fillPoly(img, [_pine(*pine)], c["pine"])
        cv2.rectangle(img, (pine[0] - 5, pine[1]), (pine[0] + 5, pine[1] + 25), c["door"], -1)
    return img


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Soft random texture (SIZE, SIZE, 1) of about unit amplitude: a cells x cells grid, upscaled."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(small, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)[:, :, None]


def _coverage(draw) -> np.ndarray:
    """(SIZE, SIZE, 1) float coverage in [0, 1] of the shape ``draw(mask)`` fills with 255."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    draw(mask)
    return mask.astype(np.float32)[:, :, None] / 255.0


def draw_photo() -> np.ndarray:
    """The scene as a photo-like RGB render: shading, texture and soft edges instead of flat colours
    and lines, as a photo gives the sketch preprocessor."""
    rng = np.random.default_rng(PHOTO_SEED)
    y = np.linspace(0.0, 1.0, SIZE, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, SIZE, dtype=np.float32)[None, :, None]
    rgb = lambda *c: np.array(c, np.float32)  # noqa: E731
    (sun_x, sun_y), _ = SUN
    glow = np.exp(-np.sqrt((x * SIZE - sun_x) ** 2 + (y * SIZE - sun_y) ** 2) / 60.0)
    img = np.minimum(rgb(70, 130, 210) * (1 - y) + rgb(200, 225, 245) * y + rgb(255, 230, 170) * glow * 0.6, 255)
    img = np.broadcast_to(img, (SIZE, SIZE, 3))

    def paint(coverage: np.ndarray, colour: np.ndarray) -> None:
        nonlocal img
        img = img * (1 - coverage) + colour * coverage

    paint(_coverage(lambda m: cv2.circle(m, SUN[0], SUN[1], 255, -1, cv2.LINE_AA)), rgb(255, 245, 210))
    rock = rgb(110, 120, 145) * (0.85 + 0.25 * x) + 12 * _smooth_noise(rng, 24)   # lit from the right
    paint(_coverage(lambda m: cv2.fillPoly(m, [_mountain_polygon()], 255, cv2.LINE_AA)), rock)
    grass = rgb(95, 160, 70) * (1.15 - 0.45 * y) + 14 * _smooth_noise(rng, 16)
    paint(_coverage(lambda m: cv2.rectangle(m, (0, HORIZON), (SIZE, SIZE), 255, -1)), grass)
    (lake_x, lake_y), (half_w, half_h) = LAKE
    rim = np.sqrt(((x * SIZE - lake_x) / half_w) ** 2 + ((y * SIZE - lake_y) / half_h) ** 2)
    water = rgb(60, 120, 200) * (1.2 - 0.5 * rim) + 10 * _smooth_noise(rng, 40)
    paint(_coverage(lambda m: cv2.ellipse(m, LAKE[0], LAKE[1], 0, 0, 360, 255, -1, cv2.LINE_AA)), water)
    planks = rgb(150, 100, 60) * (0.95 + 0.1 * np.cos(y * SIZE * np.pi / 6)) + 8 * _smooth_noise(rng, 64)
    planks = planks * np.where(np.floor(y * SIZE) % 12 == 0, 0.7, 1.0)            # gaps between planks
    paint(_coverage(lambda m: cv2.rectangle(m, CABIN[:2], CABIN[2:], 255, -1)), planks)
    paint(_coverage(lambda m: cv2.fillPoly(m, [np.array(ROOF, np.int32)], 255, cv2.LINE_AA)),
          rgb(160, 55, 45) * (1.1 - 0.4 * x))
    paint(_coverage(lambda m: cv2.rectangle(m, CHIMNEY[:2], CHIMNEY[2:], 255, -1)), rgb(120, 60, 50))
    paint(_coverage(lambda m: cv2.rectangle(m, DOOR[:2], DOOR[2:], 255, -1)), rgb(80, 50, 30))
    paint(_coverage(lambda m: cv2.rectangle(m, WINDOW[:2], WINDOW[2:], 255, -1)), rgb(250, 220, 120))
    for pine in PINES:
        px, base = pine[0], pine[1]
        paint(_coverage(lambda m: cv2.rectangle(m, (px - 5, base), (px + 5, base + 25), 255, -1)), rgb(80, 50, 30))
        needles = rgb(30, 90, 50) * (0.8 + 0.5 * np.clip((x * SIZE - px) / 40 + 0.5, 0, 1)) \
            + 8 * _smooth_noise(rng, 48)
        paint(_coverage(lambda m: cv2.fillPoly(m, [_pine(*pine)], 255, cv2.LINE_AA)), needles)
    img = cv2.GaussianBlur(np.ascontiguousarray(img), (0, 0), 0.7)   # a lens's softness
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write(out_dir: Path = OUT) -> list[Path]:
    """Write the three images into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sketch, layout, photo = out_dir / SKETCH_NAME, out_dir / LAYOUT_NAME, out_dir / PHOTO_NAME
    cv2.imwrite(str(sketch), draw_sketch(), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    cv2.imwrite(str(layout), cv2.cvtColor(draw_layout(), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    cv2.imwrite(str(photo), cv2.cvtColor(draw_photo(), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return [sketch, layout, photo]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    for path in write(parser.parse_args().out):
        print(f"{path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
