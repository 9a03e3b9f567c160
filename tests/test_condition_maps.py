"""The condition preprocessors (bps/condition_maps.py) without ComfyUI: determinism, any size, grey
and RGBA input, output range, the same look at 512 and 1024 px, and the parameter spec."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bps.condition_maps import (ALGORITHM_VERSION, KINDS, PREPROCESSORS, ConditionSpec, condition_image,  # noqa: E402
                                condition_map, parse_overrides, to_rgb_uint8)
from bps.errors import ConditionError  # noqa: E402

EXAMPLES = ROOT / "example_inputs"


def _read(name: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(EXAMPLES / name), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return _read("bps_example_photo.png")


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("kind", KINDS)
def test_each_preprocessor_is_deterministic_also_from_threads(photo, kind):
    spec = ConditionSpec.make(kind)
    first = condition_image(photo, spec)
    with ThreadPoolExecutor(4) as pool:  # the trainer prepares pairs in a thread pool
        again = list(pool.map(lambda _: condition_image(photo.copy(), spec), range(4)))
    assert all(np.array_equal(first, a) for a in again)
    assert first.dtype == np.uint8 and first.shape == (*photo.shape[:2], spec.channels)


# ------------------------------------------------------------------------------ size and input

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (2, 7), (301, 5)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_odd_and_tiny_sizes_keep_their_size(photo, kind, shape):
    image = cv2.resize(photo, shape[::-1], interpolation=cv2.INTER_AREA)
    out = condition_map(image, ConditionSpec.make(kind))
    assert out.shape == (*shape, PREPROCESSORS[kind].channels) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


@pytest.mark.parametrize("kind", ["sketch", "edges", "layout"])
def test_a_large_image_works_and_looks_like_the_small_one(photo, kind):
    big = cv2.resize(photo, (2560, 2560), interpolation=cv2.INTER_CUBIC)  # 6.5 Mpx
    spec = ConditionSpec.make(kind)
    out = condition_image(big, spec)
    assert out.shape == (2560, 2560, spec.channels)
    small = condition_image(photo, spec).astype(np.float32)
    down = cv2.resize(out, (512, 512), interpolation=cv2.INTER_AREA).reshape(small.shape).astype(np.float32)
    assert np.abs(down - small).mean() < 0.02 * 255, kind


@pytest.mark.parametrize("kind", KINDS)
def test_grey_rgba_float_and_16_bit_inputs_mean_the_same_picture(photo, kind):
    spec = ConditionSpec.make(kind)
    grey = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    from_grey = condition_image(grey, spec)
    assert np.array_equal(from_grey, condition_image(grey[:, :, None], spec))
    assert np.array_equal(from_grey, condition_image(np.repeat(grey[:, :, None], 3, 2), spec))
    # opaque RGBA is the RGB image; alpha composites onto black like the trainer's image reader
    opaque = np.concatenate([photo, np.full(photo.shape[:2] + (1,), 255, np.uint8)], axis=2)
    assert np.array_equal(condition_image(opaque, spec), condition_image(photo, spec))
    clear = opaque.copy()
    clear[:, :, 3] = 0
    assert np.array_equal(condition_image(clear, spec), condition_image(np.zeros_like(photo), spec))
    # float in [0, 1] (a ComfyUI IMAGE) and 16 bit give back the exact 8-bit levels
    assert np.array_equal(condition_image(photo.astype(np.float32) / 255.0, spec), condition_image(photo, spec))
    assert np.array_equal(condition_image(photo.astype(np.uint16) * 257, spec), condition_image(photo, spec))


def test_bad_arrays_are_refused_with_what_was_given():
    spec = ConditionSpec.make("sketch")
    with pytest.raises(ConditionError, match="empty"):
        condition_image(np.zeros((0, 5, 3), np.uint8), spec)
    with pytest.raises(ConditionError, match=r"\(4, 4, 2\)"):
        condition_image(np.zeros((4, 4, 2), np.uint8), spec)
    with pytest.raises(ConditionError, match="int64"):
        condition_image(np.zeros((4, 4, 3), np.int64), spec)
    assert to_rgb_uint8(np.full((2, 2), np.nan, np.float32)).max() == 0  # NaN pixels become black


@pytest.mark.parametrize("kind", KINDS)
def test_output_is_in_0_1_and_exactly_the_8_bit_image_over_255(photo, kind):
    spec = ConditionSpec.make(kind)
    as_map, as_image = condition_map(photo, spec), condition_image(photo, spec)
    assert as_map.min() >= 0.0 and as_map.max() <= 1.0
    assert np.array_equal(as_map, as_image.astype(np.float32) / np.float32(255.0))


# ----------------------------------------------------------------------------- what they draw

def test_sketch_draws_light_strokes_on_black_where_a_drawing_has_ink():
    drawing = _read("bps_example_sketch.png")           # black ink on white paper
    strokes = condition_image(drawing, ConditionSpec.make("sketch"))[:, :, 0]
    ink = drawing[:, :, 0] < 64
    paper = cv2.erode((~ink).astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)  # far from any ink
    assert strokes[ink].mean() > 120 and strokes[paper].max() == 0
    flat = np.full((64, 64, 3), 90, np.uint8)
    for kind in ("sketch", "edges"):
        assert condition_image(flat, ConditionSpec.make(kind)).max() == 0, kind


def test_edges_are_binary_lines_on_the_borders_of_a_square():
    square = np.zeros((128, 128, 3), np.uint8)
    square[32:96, 32:96] = 255
    edges = condition_image(square, ConditionSpec.make("edges"))[:, :, 0]
    assert set(np.unique(edges)) == {0, 255}
    ys, xs = np.nonzero(edges)
    assert ys.min() >= 29 and ys.max() <= 98 and xs.min() >= 29 and xs.max() <= 98
    assert edges[40:88, 40:88].max() == 0  # nothing inside the square


def test_layout_paints_flat_regions_close_to_the_picture(photo):
    layout_example = _read("bps_example_layout.png")    # 10 flat colours
    out = condition_image(layout_example, ConditionSpec.make("layout", {"colors": 10, "smooth": 1}))
    close = np.abs(out.astype(int) - layout_example.astype(int)).max(axis=2) <= 12
    assert close.mean() > 0.95
    for colors in (2, 5, 8):
        got = condition_image(photo, ConditionSpec.make("layout", {"colors": colors}))
        assert 2 <= len(np.unique(got.reshape(-1, 3), axis=0)) <= colors


@pytest.mark.parametrize("kind", ["sketch", "edges", "layout"])
def test_512_and_1024_px_versions_of_a_picture_look_alike(photo, kind):
    """Sizes are relative to the image: the 1024-px result, brought down to 512, is the 512-px one,
    with strokes as bright and as dense (not half as thick)."""
    spec = ConditionSpec.make(kind)
    at_512 = condition_image(photo, spec).astype(np.float32)
    big = cv2.resize(photo, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    at_1024 = condition_image(big, spec)
    down = cv2.resize(at_1024, (512, 512), interpolation=cv2.INTER_AREA).reshape(at_512.shape).astype(np.float32)
    assert np.abs(down - at_512).mean() < 0.015 * 255
    if kind != "layout":
        ratio = float(at_1024.mean()) / float(at_512.mean())   # share of the picture that is stroke
        assert 0.8 < ratio < 1.25, ratio


# ------------------------------------------------------------------------------------ spec

def test_spec_serialises_to_canonical_json_and_back():
    spec = ConditionSpec.make("edges", {"low": "60", "high": 120})
    data = json.loads(spec.to_json())
    assert data == {"kind": "edges", "params": {"low": 60.0, "high": 120.0, "sigma": 1.0, "thickness": 1.0},
                    "version": ALGORITHM_VERSION}
    assert ConditionSpec.from_dict(data) == spec and ConditionSpec.from_dict(spec.to_dict()).to_json() == spec.to_json()
    assert ConditionSpec.make("layout", {"colors": "12"}).params.colors == 12
    assert ConditionSpec.make("gray").to_dict()["params"] == {}
    assert ConditionSpec.make("sketch").to_json() != ConditionSpec.make("sketch", {"sigma": 2}).to_json()
    assert [PREPROCESSORS[k].channels for k in KINDS] == [1, 1, 3, 1, 3]


@pytest.mark.parametrize("kind, overrides, message", [
    ("pencil", {}, "unknown condition 'pencil'; choose one of sketch, edges, layout, gray, rgb"),
    ("sketch", {"sigmaa": 2}, "sketch has no parameter 'sigmaa'; its parameters are sigma=1.4"),
    ("sketch", {"sigma": "wide"}, "sketch: sigma must be a number, got 'wide'"),
    ("sketch", {"sigma": 0}, "sketch: sigma must be a number from 0.3 to 20"),
    ("edges", {"low": 300, "high": 100}, "low \\(300\\) must not exceed high \\(100\\)"),
    ("layout", {"colors": 2.5}, "colors must be a whole number"),
    ("gray", {"sigma": 1}, "gray has no parameter 'sigma'; its parameters are none"),
])
def test_bad_specs_name_the_problem_and_the_choices(kind, overrides, message):
    with pytest.raises(ConditionError, match=message):
        ConditionSpec.make(kind, overrides)


def test_parse_overrides_takes_lists_or_one_text():
    assert parse_overrides(["sigma=2", "threshold=0.01"]) == {"sigma": "2", "threshold": "0.01"}
    assert parse_overrides("low=10, high=20\nsigma=1") == {"low": "10", "high": "20", "sigma": "1"}
    assert parse_overrides("") == {}
    with pytest.raises(ConditionError, match="key=value"):
        parse_overrides("sigma 2")
    with pytest.raises(ConditionError, match="twice"):
        parse_overrides("sigma=1 sigma=2")


def test_the_readmes_condition_pictures_are_what_their_script_draws(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("draw_condition_examples", ROOT / "tools" / "draw_condition_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.write(tmp_path)
    assert len(written) == len(module.EXAMPLES) * (1 + len(module.KINDS))
    for path in written:
        shipped = ROOT / "docs" / "conditions" / path.name
        assert shipped.is_file(), f"{shipped.name} is missing: python tools/draw_condition_examples.py"
        assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), cv2.imread(str(shipped), cv2.IMREAD_UNCHANGED)), \
            f"{shipped.name} is stale: python tools/draw_condition_examples.py"
    readme = (ROOT / "README.md").read_text()
    assert all(f"docs/conditions/{p.name}" in readme for p in written)
