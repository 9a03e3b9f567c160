"""Training from a folder of images alone (--condition), without ComfyUI or a model: the data
layouts, the bad-image report, the cache (keys and the conditions it stores) and the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bps.condition_maps import KINDS, PREPROCESSORS, ConditionSpec, condition_image, parameter_help  # noqa: E402
from train.cache import CacheConfig, CachedPairs, TrainingCache, prepare_pair, sample_keys  # noqa: E402
from train.cli import CONDITION_KINDS, build_parser, parse_args  # noqa: E402
from train.dataset import DataError, find_pairs, load_pairs  # noqa: E402
from train.images import fit_image, read_image  # noqa: E402

SKETCH = ConditionSpec.make("sketch")


def _photo(path: Path, h: int = 48, w: int = 64, seed: int = 0) -> Path:
    """A small picture with edges (a bright disc on a gradient), written as an image file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = np.linspace(30, 120, w, dtype=np.uint8)[None, :, None]
    cv2.circle(img, (int(rng.integers(15, w - 15)), h // 2), 12, (230, 210, 180), -1)
    assert cv2.imwrite(str(path), img)
    return path


def _targets(folder: Path, names=("a", "b", "c")) -> Path:
    for i, n in enumerate(names):
        _photo(folder / "target" / f"{n}.png", seed=i)
        (folder / "target" / f"{n}.txt").write_text(f"a picture of {n}")
    return folder


# ------------------------------------------------------------------------------- data layouts

def test_a_folder_of_images_and_captions_is_a_training_set(tmp_path):
    data = _targets(tmp_path / "plain")
    pairs, problems = load_pairs(data, from_targets="sketch")
    assert problems == [] and [p.source for p in pairs] == [None] * 3
    assert [p.target.name for p in pairs] == ["a.png", "b.png", "c.png"] and pairs[0].prompts == ("a picture of a",)
    # one --prompt instead of caption files
    bare = tmp_path / "bare"
    for n in ("x", "y"):
        _photo(bare / "target" / f"{n}.jpg")
    pairs, problems = load_pairs(bare, prompt="a photo", from_targets="edges")
    assert problems == [] and [p.prompts for p in pairs] == [("a photo",), ("a photo",)]
    # the official layout: JSON records naming only target and prompt
    records = [{"target": "target/a.png", "prompt": "one"}, {"target": "b.png", "prompt": ["two", "deux"]}]
    (data / "prompt.json").write_text(json.dumps(records))
    pairs, problems = find_pairs(data, from_targets="layout")
    assert problems == [] and [p.prompts for p in pairs] == [("one",), ("two", "deux")]
    assert all(p.source is None for p in pairs)


def test_without_condition_a_folder_without_source_says_to_pass_one(tmp_path):
    data = _targets(tmp_path)
    with pytest.raises(DataError, match="no source/ folder.*--condition sketch"):
        find_pairs(data)


def test_source_folders_and_records_are_refused_as_ambiguous(tmp_path):
    data = _targets(tmp_path / "plain")
    (data / "source").mkdir()
    with pytest.raises(DataError, match="has a source/ folder, but --condition sketch makes the conditions"):
        find_pairs(data, from_targets="sketch")
    official = _targets(tmp_path / "official", names=("a",))
    (official / "prompt.json").write_text(json.dumps([{"source": "a.png", "target": "a.png", "prompt": "p"}]))
    pairs, problems = find_pairs(official, from_targets="sketch")
    assert pairs == [] and "names a source, but --condition sketch" in str(problems[0])
    with pytest.raises(DataError, match="no target/ folder; --condition edges makes"):
        find_pairs(tmp_path / "plain" / "source", from_targets="edges")


def test_broken_empty_and_uncaptioned_images_are_reported_by_name_before_any_model(tmp_path):
    data = _targets(tmp_path, names=("good", "empty", "corrupt", "nocap"))
    (data / "target" / "empty.png").write_bytes(b"")
    (data / "target" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (data / "target" / "nocap.txt").unlink()
    with pytest.raises(DataError) as e:
        load_pairs(data, from_targets="sketch")
    text = str(e.value)
    assert "found 3 problem(s)" in text and "(1 of 4 entries usable)" in text
    assert "target image empty.png is unreadable: file is empty" in text
    assert "target image corrupt.png is unreadable: not a readable image" in text
    assert "target/nocap.png: no caption" in text and "good" not in text.replace("--skip-bad", "")
    pairs, skipped = load_pairs(data, from_targets="sketch", skip_bad=True)
    assert [p.target.name for p in pairs] == ["good.png"] and len(skipped) == 3


# ------------------------------------------------------------------------------------ cache

def test_the_cache_stores_the_preprocessors_condition_of_the_fitted_target(tmp_path):
    data = _targets(tmp_path / "data", names=("a", "b"))
    pairs, _ = load_pairs(data, from_targets="sketch")
    size = (64, 64)

    def encode(pixels):
        return torch.zeros(pixels.shape[0], 4, 8, 8)

    config = CacheConfig(size=size, hint_channels=1, base_identity="base0", condition=SKETCH)
    cache = TrainingCache(tmp_path / "cache", config)
    keys = sample_keys(pairs, config)
    assert cache.encode_samples(pairs, keys, encode, workers=2) == 2
    for pair, key in zip(pairs, keys):
        fitted = fit_image(read_image(pair.target, 3), size)           # the pixels the VAE encodes
        want = condition_image(fitted, SKETCH)
        _, hint = cache.load_sample(key)
        assert hint.dtype == torch.uint8 and torch.equal(hint, torch.from_numpy(want).permute(2, 0, 1))
        assert np.array_equal(prepare_pair(pair, size, 1, SKETCH)[1], want)
    cache.encode_prompts([q for pair in pairs for q in pair.prompts], lambda prompt: torch.zeros(1, 77, 768))
    item = CachedPairs(cache, keys, pairs)[0]
    assert item["hint"].shape == (1, 64, 64) and float(item["hint"].max()) > 0.5   # strokes were drawn
    # a 3-channel preprocessor caches 3 channels
    layout = ConditionSpec.make("layout")
    assert prepare_pair(pairs[0], size, 3, layout)[1].shape == (64, 64, 3)
    with pytest.raises(ValueError, match="--condition"):
        prepare_pair(pairs[0], size, 1, None)


def test_cache_keys_follow_the_preprocessor_and_its_parameters(tmp_path):
    pairs, _ = load_pairs(_targets(tmp_path, names=("a",)), from_targets="sketch")

    def key(condition):
        return sample_keys(pairs, CacheConfig(size=(64, 64), hint_channels=condition.channels, base_identity="b",
                                              condition=condition))[0]

    keys = {key(ConditionSpec.make("sketch")), key(ConditionSpec.make("sketch", {"sigma": 2})),
            key(ConditionSpec.make("edges")), key(ConditionSpec.make("gray"))}
    assert len(keys) == 4 and key(ConditionSpec.make("sketch", {"sigma": "1.4"})) == key(SKETCH)
    with pytest.raises(ValueError, match="no --condition preprocessor"):
        sample_keys(pairs, CacheConfig(size=(64, 64), hint_channels=1, base_identity="b"))


# ----------------------------------------------------------------------------- command line

def test_cli_condition_sets_channels_and_meaning_and_refuses_contradictions(capsys):
    base = ["--ckpt", "x.safetensors", "--out", "a.safetensors", "--data", "d"]
    args = parse_args(base + ["--condition", "layout", "--condition-param", "colors=6"])
    assert (args.hint_channels, args.hint_meaning, args.condition_param) == (3, "layout", ["colors=6"])
    args = parse_args(base + ["--condition", "sketch", "--hint-meaning", "pencil sketch"])
    assert (args.hint_channels, args.hint_meaning) == (1, "pencil sketch")
    assert parse_args(base).hint_channels == 1 and parse_args(base).condition is None
    for argv, message in [
        (base + ["--condition", "layout", "--hint-channels", "1"], "makes 3-channel conditions"),
        (base + ["--condition", "sketch", "--hint-channels", "3", "--extra-map"], "style adapters"),
        (base + ["--condition-param", "sigma=2"], "pass --condition"),
        (["--ckpt", "x.safetensors", "--out", "a.safetensors", "--condition", "sketch"], "pass --data DIR"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err, argv


def test_cli_lists_every_preprocessor_with_its_real_defaults():
    assert {k: v[0] for k, v in CONDITION_KINDS.items()} == {k: p.channels for k, p in PREPROCESSORS.items()}
    assert {k: v[1] for k, v in CONDITION_KINDS.items()} == {k: p.meaning for k, p in PREPROCESSORS.items()}
    text = build_parser().format_help()
    assert list(CONDITION_KINDS) == list(KINDS)
    for kind in KINDS:
        for item in parameter_help(kind).split(", "):
            if item != "none":
                assert item in text, (kind, item)


# ------------------------------------------------------------------------- on the mini base

def test_the_mini_base_demo_trains_and_evaluates_from_images_alone(tmp_path):
    """try_mini_base.py --condition: a folder of the shapes' images and captions (no sketches) that
    the trainer accepts, and held-out conditions made from the held-out targets the same way."""
    from train.mini_base import shapes
    from train.mini_base.evaluate import HeldOut

    layouts = shapes.random_layouts(1000, 3)
    folder = shapes.write_image_folder(tmp_path / "images", layouts)
    assert not (folder / "source").exists()
    pairs, problems = load_pairs(folder, from_targets="sketch")
    assert problems == [] and [p.prompts[0] for p in pairs] == [l.caption for l in layouts]
    held = HeldOut.draw(0, 3, size=64)
    made = held.conditions_from_targets(SKETCH, size=64)
    assert made.sketches.shape == (3, 1, 64, 64) and made.latents is held.latents
    for layout, sketch in zip(held.layouts, made.sketches):
        want = condition_image(shapes.render_image(layout, 64), SKETCH)
        assert torch.equal(sketch[0], torch.from_numpy(want[:, :, 0]).float() / 255.0)
    assert float(made.sketches.amax()) > 0.9  # the shapes' outlines were drawn
