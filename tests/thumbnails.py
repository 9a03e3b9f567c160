"""Template thumbnails made from what a workflow really uses: its condition images, the conditions
its nodes made from them and the plots its preview nodes drew, as the browser test's run of the
workflow left them on the server.

The template browser shows ``example_workflows/NAME.jpg`` in a square tile next to ``NAME.json``.
tests/test_browser_workflows.py writes them with ``BPS_WRITE_THUMBNAILS=1``.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageChops

SIZE = 384
BACKGROUND = (32, 32, 32)  # the template browser's dark tile


def merge_conditions(paths: list[Path]) -> Image.Image:
    """One picture of every condition image: multiplied together (a layout with the sketch's dark
    strokes drawn over it; a lone sketch stays itself), at the first image's size."""
    images = [Image.open(p).convert("RGB") for p in paths]
    merged = images[0]
    for image in images[1:]:
        merged = ImageChops.multiply(merged, image.resize(merged.size))
    # Colour first (a layout), strokes on top: multiplication is symmetric, so the order only
    # matters for the size, which is the first image's.
    return merged


def thumbnail(conditions: list[Path], plots: list[Path] = (), size: int = SIZE,
              made: list[Path] = ()) -> Image.Image:
    """A square thumbnail: the merged condition images; with a plot, the plot fills the tile's
    width at the bottom and the conditions sit above it at the left. ``made``: conditions a node
    made from the loaded images (BPS Condition from Image), shown beside them: the photo at the
    top left, what became of it at the bottom right."""
    tile = Image.new("RGB", (size, size), BACKGROUND)
    cond = merge_conditions(conditions) if conditions else None
    if made and cond is not None:
        side = size * 5 // 8
        tile.paste(cond.resize((side, side), Image.LANCZOS), (0, 0))
        result = Image.open(made[0]).convert("RGB").resize((side, side), Image.LANCZOS)
        tile.paste(result, (size - side, size - side))
        return tile
    if plots:
        plot = Image.open(plots[0]).convert("RGB")
        plot.thumbnail((size, size), Image.LANCZOS)
        tile.paste(plot, (0, size - plot.height))
        if cond is not None:
            side = size - plot.height - 8
            if side >= 32:
                tile.paste(cond.resize((side, side), Image.LANCZOS), (4, 4))
    elif cond is not None:
        cond.thumbnail((size, size), Image.LANCZOS)
        tile.paste(cond, ((size - cond.width) // 2, (size - cond.height) // 2))
    return tile


def jpeg(image: Image.Image, quality: int = 85) -> bytes:
    """``image`` as a small progressive JPEG."""
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, optimize=True, progressive=True)
    return out.getvalue()
