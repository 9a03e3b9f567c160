"""Draw the README's pictures of every condition preprocessor on the shipped example images.

    python tools/draw_condition_examples.py      # writes docs/conditions/<example>_<kind>.png

Each example image of example_inputs/ (the photo, the line sketch, the colour layout) goes through
every preprocessor of bps/condition_maps.py with its default parameters, at the image's own 512 px
(the size the trainer and the node work at); the pictures are then shrunk to 256 px for the page.
``rgb`` is the image itself, so it is not drawn. tests/test_condition_maps.py checks that the
committed pictures are what this script draws.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bps.condition_maps import ConditionSpec, condition_image  # noqa: E402

OUT = ROOT / "docs" / "conditions"
#: Example image -> its short name in the picture file names.
EXAMPLES = {"bps_example_photo.png": "photo", "bps_example_sketch.png": "sketch",
            "bps_example_layout.png": "layout"}
#: The preprocessors drawn (rgb would repeat the input).
KINDS = ("sketch", "edges", "layout", "gray")
SIDE = 256


def _shrink(img: np.ndarray) -> np.ndarray:
    return cv2.resize(img, (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def _write(path: Path, rgb_or_grey: np.ndarray) -> None:
    img = rgb_or_grey if rgb_or_grey.ndim == 2 or rgb_or_grey.shape[2] == 1 else cv2.cvtColor(rgb_or_grey,
                                                                                              cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, 9])


def write(out_dir: Path = OUT) -> list[Path]:
    """Write every picture into ``out_dir``: ``<example>_input.png`` and ``<example>_<kind>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file, name in EXAMPLES.items():
        image = cv2.cvtColor(cv2.imread(str(ROOT / "example_inputs" / file), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        _write(out_dir / f"{name}_input.png", _shrink(image))
        written.append(out_dir / f"{name}_input.png")
        for kind in KINDS:
            condition = condition_image(image, ConditionSpec.make(kind))
            path = out_dir / f"{name}_{kind}.png"
            _write(path, _shrink(condition))
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    paths = write(parser.parse_args().out)
    print(f"wrote {len(paths)} pictures, {sum(p.stat().st_size for p in paths) / 1024:.0f} KiB, to {paths[0].parent}")


if __name__ == "__main__":
    main()
