"""train/condition_agreement.py and train/comparison_grid.py: pure OpenCV, cases with known answers."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.comparison_grid import comparison_grid, save_comparison_grid  # noqa: E402
from train.condition_agreement import (default_tolerance, edge_agreement, layout_regions,  # noqa: E402
                                       region_agreement)
from train.demo_data import draw_pair  # noqa: E402


def test_edges_of_an_image_match_its_own_sketch_not_another():
    sketch, image, _ = draw_pair(0, 256)
    other, _, _ = draw_pair(1, 256)
    own = edge_agreement(sketch, image)
    assert own.f1 > 0.9 and own.chamfer < default_tolerance(256, 256)
    wrong = edge_agreement(other, image)
    assert wrong.f1 < 0.4 and wrong.chamfer > 3 * own.chamfer
    # polarity does not matter: black lines on white score like white on black
    assert edge_agreement(255 - sketch, image).f1 == pytest.approx(own.f1, abs=0.05)
    # a shift beyond the tolerance loses the match
    shifted = np.roll(image, 12, axis=1)
    assert edge_agreement(sketch, shifted).f1 < 0.5 * own.f1
    # a flat image has no edges: F 0, chamfer infinite
    flat = edge_agreement(sketch, np.full_like(image, 128))
    assert flat.f1 == 0 and flat.chamfer == float("inf")


def test_region_agreement_is_one_for_flat_regions_and_near_zero_for_noise():
    layout = np.zeros((128, 128, 3), np.uint8)
    layout[:, 64:] = (200, 40, 40)
    layout[80:, :] = (40, 200, 40)
    assert int(layout_regions(layout).max()) == 2
    painted = np.where(layout > 0, 255 - layout, 30).astype(np.uint8)  # other colours, same regions
    assert region_agreement(layout, painted) == pytest.approx(1.0, abs=1e-6)
    noise = np.random.default_rng(0).integers(0, 256, layout.shape, dtype=np.uint8)
    assert region_agreement(layout, noise) < 0.01
    half = painted.copy()
    half[:, :32] = noise[:, :32]
    assert 0.1 < region_agreement(layout, half) < 0.95
    assert np.isnan(region_agreement(np.zeros_like(layout), painted)), "a single region says nothing"


def test_comparison_grid_lays_out_labelled_rows(tmp_path):
    conds = [np.zeros((64, 64), np.uint8), np.full((64, 64), 255, np.uint8)]
    imgs = [np.full((64, 64, 3), v, np.uint8) for v in (10, 200)]
    grid = comparison_grid(conds, imgs, {"base": imgs, "steered": imgs[::-1]})
    assert grid.shape == (26 + 2 * 130, 4 * 130, 3)
    assert (grid[26 + 130 + 5, 5] == 255).all() and (grid[26 + 5, 3 * 130 + 5] == 200).all()
    assert (grid[:26] < 128).any(), "column labels are drawn"
    path = save_comparison_grid(tmp_path / "g.png", conds, None, {"steered": imgs})
    assert cv2.imread(str(path)).shape == (26 + 2 * 130, 2 * 130, 3)
    with pytest.raises(ValueError, match="one image per condition"):
        comparison_grid(conds, None, {"steered": imgs[:1]})
