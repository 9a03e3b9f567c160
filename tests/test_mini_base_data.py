"""The mini base's data, stand-ins and scores (issue 16), without ComfyUI."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.dataset import load_pairs  # noqa: E402
from train.mini_base import shapes  # noqa: E402
from train.mini_base.fidelity import Fidelity, centroid_error, iou  # noqa: E402
from train.mini_base.stand_ins import StandInTextEncoder, StandInVAE  # noqa: E402


def test_layouts_are_seeded_and_two_random_layouts_overlap_little():
    assert shapes.random_layouts(3, 5) == shapes.random_layouts(3, 5)
    assert shapes.random_layouts(3, 5) != shapes.random_layouts(4, 5)
    # the bar: a model that ignores the sketch scores at most 0.2 by chance
    assert shapes.mean_random_iou(seed=0, count=300) <= 0.2
    kinds = {l.kind for l in shapes.random_layouts(0, 200)}
    assert kinds == set(shapes.KINDS)


def test_sketch_outlines_the_region_the_image_fills():
    for layout in shapes.random_layouts(7, 20):
        image, sketch, region = shapes.render_image(layout), shapes.render_sketch(layout), shapes.region_mask(layout)
        assert image.shape == (shapes.SIZE, shapes.SIZE, 3) and sketch.shape == (shapes.SIZE, shapes.SIZE)
        assert iou(shapes.shape_mask(image), region) > 0.97
        strokes = sketch > 127
        # the strokes run along the region's border: inside or next to it, never far away
        near = cv2.dilate(region.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert strokes.sum() > 0 and (strokes & ~near).sum() <= 0.01 * strokes.sum()
        inside = cv2.erode(region.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        assert (strokes & inside).sum() <= 0.02 * max(1, inside.sum())  # an outline, not a fill


def test_shapes_are_white_and_a_coloured_cast_is_not_a_shape():
    layout = shapes.random_layouts(5, 1)[0]
    image = shapes.render_image(layout)
    region = shapes.region_mask(layout)
    assert (image[region] >= 128).all() and (image[~region] < 128).all()
    assert np.ptp(image[region].astype(int), axis=1).max() == 0  # grey levels only: white, its anti-aliased edge
    # a saturated cast over the background (what a base that has not learnt the mean colour draws)
    cast = np.zeros((shapes.SIZE, shapes.SIZE, 3), np.float32)
    cast[...] = (0.7, 0.1, 0.5)  # its brightest channel is over half, its mean is not
    assert not shapes.shape_mask(cast).any()
    cast[region] = 1.0
    assert iou(shapes.shape_mask(cast), region) > 0.97


def test_stand_in_vae_round_trip_keeps_shapes_and_is_the_ceiling():
    vae = StandInVAE()
    layouts = shapes.random_layouts(11, 40)
    pixels = torch.from_numpy(np.stack([shapes.render_image(l) for l in layouts])).float() / 255
    latents = vae.encode(pixels)
    assert latents.shape == (40, 4, 16, 16)
    assert torch.equal(vae.encode(pixels), latents)  # deterministic
    # model-space latents (x 0.18215) stay within about [-1.5, 1.5]
    assert float((latents * 0.18215).abs().max()) < 1.5
    back = vae.decode(latents).numpy()
    assert back.shape == (40, 128, 128, 3) and back.min() >= 0 and back.max() <= 1
    # an 8x8 area mean and its inverse lose only the edges: the IoU ceiling is high, not perfect
    ceiling = Fidelity.of([shapes.shape_mask(b) for b in back], [shapes.region_mask(l) for l in layouts])
    assert 0.8 < ceiling.iou < 1.0 and ceiling.empty == 0
    # a constant colour survives the round trip exactly (the map's pseudo-inverse)
    flat = torch.full((1, 16, 16, 3), 0.3)
    assert torch.allclose(vae.decode(vae.encode(flat)), flat, atol=1e-5)


def test_stand_in_text_encoder_ignores_the_prompt():
    enc = StandInTextEncoder(64)
    assert torch.equal(enc.encode("a red star"), enc.encode("")) and enc.encode("x").shape == (1, 1, 64)


def test_iou_and_centroid_error():
    a = np.zeros((10, 10), bool)
    a[2:6, 2:6] = True
    b = np.zeros_like(a)
    b[4:8, 4:8] = True
    assert iou(a, a) == 1.0 and abs(iou(a, b) - 4 / 28) < 1e-9
    assert abs(centroid_error(a, b) - np.hypot(2, 2) / 10) < 1e-9
    assert centroid_error(np.zeros_like(a), b) is None
    f = Fidelity.of([a, np.zeros_like(a)], [a, b])
    assert f.iou == 0.5 and f.empty == 0.5 and f.centroid == 0.0 and f.count == 2


def test_pair_folder_is_a_training_folder_the_trainer_reads(tmp_path):
    layouts = shapes.random_layouts(1, 5)
    folder = shapes.write_pair_folder(tmp_path / "pairs", layouts)
    stamp = (folder / "source" / "0000.png").stat().st_mtime_ns
    shapes.write_pair_folder(folder, layouts)  # unchanged files stay untouched (cache keys)
    assert (folder / "source" / "0000.png").stat().st_mtime_ns == stamp
    pairs, skipped = load_pairs(folder, workers=1)
    assert len(pairs) == 5 and not skipped and pairs[0].prompts == (layouts[0].caption,)
