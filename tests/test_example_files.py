"""The files a newcomer gets with the example workflows, checked without a server or a browser:
each workflow's thumbnail, the condition images it loads (shipped, and reproducible from their
script), its note, and the overlap rule the browser test applies to the frontend's layout."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_frontend import NodeBox, overlapping_pairs

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))


def _draw_script():
    spec = importlib.util.spec_from_file_location("draw_example_inputs", ROOT / "tools" / "draw_example_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_each_workflow_has_a_small_square_jpeg_thumbnail(path):
    thumb = path.with_suffix(".jpg")  # the only name the template browser asks for
    assert thumb.is_file(), f"{thumb.name} is missing (BPS_WRITE_THUMBNAILS=1 pytest tests/test_browser_workflows.py)"
    with Image.open(thumb) as image:
        assert image.format == "JPEG" and image.width == image.height >= 256
    assert thumb.stat().st_size < 100_000


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_each_workflow_loads_only_shipped_images_and_explains_itself(path):
    nodes = json.loads(path.read_text())["nodes"]
    images = [n["widgets_values"][0] for n in nodes if n["type"] == "LoadImage"]
    assert images and all((ROOT / "example_inputs" / name).is_file() for name in images), images
    notes = [n["widgets_values"][0] for n in nodes if n["type"] == "Note"]
    assert len(notes) == 1 and all(name in notes[0] for name in images), notes


def test_example_inputs_are_what_their_script_draws(tmp_path):
    draw = _draw_script()
    for written in draw.write(tmp_path):
        shipped = ROOT / "example_inputs" / written.name
        assert np.array_equal(np.asarray(Image.open(written)), np.asarray(Image.open(shipped))), shipped.name
    sketch = np.asarray(Image.open(ROOT / "example_inputs" / draw.SKETCH_NAME))
    layout = np.asarray(Image.open(ROOT / "example_inputs" / draw.LAYOUT_NAME))
    assert sketch.shape == (512, 512) and layout.shape == (512, 512, 3)  # 1-channel and 3-channel hints
    assert (sketch < 128).mean() > 0.02 and len(np.unique(layout.reshape(-1, 3), axis=0)) == len(draw.COLOURS)


def test_the_pack_has_a_human_label_in_the_template_browser():
    labels = json.loads((ROOT / "locales" / "en" / "main.json").read_text())["templateWorkflows"]["category"]
    assert labels["ComfyUI-BPS"] == labels["comfyui-bps"] and "BPS" in labels["ComfyUI-BPS"]


def test_overlapping_pairs_finds_shared_area_only():
    a = NodeBox(1, "A", "a", 0, 0, 100, 100)
    touching = NodeBox(2, "B", "b", 100, 0, 50, 50)   # shares an edge only
    inside = NodeBox(3, "C", "c", 90, 90, 50, 50)     # shares a 10x10 corner with a
    below = NodeBox(4, "D", "d", 0, 150, 100, 10)
    assert overlapping_pairs([a, touching, inside, below]) == [(a, inside)]
