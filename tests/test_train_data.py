"""Trainer pieces that need neither ComfyUI nor a model: data layouts and the all-at-once bad-data
report, demo set, image sizing, command line, checkpoints, data order, loss log, cache keys."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train import checkpointing as ckpt  # noqa: E402
from train.cache import CacheConfig, CachedPairs, TrainingCache, collate, sample_keys  # noqa: E402
from train.cli import build_parser, checkpoint_dir, parse_args  # noqa: E402
from train.data_order import BatchStream, steps_for_epochs  # noqa: E402
from train.dataset import DataError, find_pairs, load_pairs  # noqa: E402
from train.hint_layout import HintLayout  # noqa: E402
from train.demo_data import NUM_PAIRS, draw_pair, write_demo_set  # noqa: E402
from train.images import fit_image, read_image, training_size  # noqa: E402
from train.loss_log import GAP_COLUMNS, LossLog, draw_loss_curve, gap_series, read_loss_log  # noqa: E402


def _png(path: Path, h: int = 32, w: int = 32, value: int = 128, channels: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, channels) if channels > 1 else (h, w), value, np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def _plain(tmp_path: Path, names=("a", "b", "c"), caption=True) -> Path:
    for n in names:
        _png(tmp_path / "source" / f"{n}.png", channels=1)
        _png(tmp_path / "target" / f"{n}.png")
        if caption:
            (tmp_path / "target" / f"{n}.txt").write_text(f"a photo of {n}\n")
    return tmp_path


# ------------------------------------------------------------------------------- layouts

def test_official_layout_json_lines_and_array(tmp_path):
    for n in ("0", "1"):
        _png(tmp_path / "source" / f"{n}.png", channels=1)
        _png(tmp_path / "target" / f"{n}.png")
    lines = [{"source": "source/0.png", "target": "target/0.png", "prompt": "a cat"},
             {"source": "1.png", "target": "1.png", "prompt": ["a dog", "  a   puppy "]}]
    (tmp_path / "prompt.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    pairs, problems = find_pairs(tmp_path)
    assert problems == []
    assert [p.prompts for p in pairs] == [("a cat",), ("a dog", "a puppy")]
    assert pairs[1].source == tmp_path / "source" / "1.png"

    (tmp_path / "prompt.json").unlink()
    (tmp_path / "train.json").write_text(json.dumps(lines))
    pairs, problems = find_pairs(tmp_path)
    assert problems == [] and len(pairs) == 2


def test_plain_layout_captions_next_to_targets_in_captions_dir_or_shared_prompt(tmp_path):
    _plain(tmp_path, names=("a",))
    _png(tmp_path / "source" / "b.jpg", channels=1)
    _png(tmp_path / "target" / "b.png")  # other extension, same name
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "b.txt").write_text("from the captions folder")
    _png(tmp_path / "source" / "c.png", channels=1)
    _png(tmp_path / "target" / "c.png")
    pairs, problems = find_pairs(tmp_path, prompt="shared prompt")
    assert problems == []
    assert {p.target.stem: p.prompts for p in pairs} == {
        "a": ("a photo of a",), "b": ("from the captions folder",), "c": ("shared prompt",)}


def test_bad_data_is_reported_all_at_once_and_skip_bad_continues(tmp_path):
    _plain(tmp_path, names=("good1", "good2", "corrupt", "mismatch", "emptycap", "truncated"))
    (tmp_path / "target" / "corrupt.png").write_bytes(b"this is not a png")
    _png(tmp_path / "target" / "mismatch.png", h=48, w=32)
    (tmp_path / "target" / "emptycap.txt").write_text("   \n")
    data = (tmp_path / "source" / "truncated.png").read_bytes()
    (tmp_path / "source" / "truncated.png").write_bytes(data[: len(data) // 2])
    _png(tmp_path / "target" / "nosource.png")
    (tmp_path / "target" / "nosource.txt").write_text("x")
    _png(tmp_path / "source" / "notarget.png", channels=1)
    _png(tmp_path / "source" / "nocaption.png", channels=1)
    _png(tmp_path / "target" / "nocaption.png")

    with pytest.raises(DataError) as e:
        load_pairs(tmp_path)
    msg = str(e.value)
    offenders = ["corrupt.png", "mismatch.png", "emptycap", "truncated.png", "nosource.png", "notarget.png",
                 "nocaption"]
    for name in offenders:
        assert name in msg, f"{name} missing from report:\n{msg}"
    assert "good1" not in msg and "good2" not in msg
    assert len(e.value.problems) == len(offenders)
    assert "--skip-bad" in msg and "32x48" in msg and "is empty" in msg

    pairs, problems = load_pairs(tmp_path, skip_bad=True)
    assert sorted(p.target.stem for p in pairs) == ["good1", "good2"]
    assert len(problems) == len(offenders)


def test_bad_json_records_are_listed_with_their_lines(tmp_path):
    _png(tmp_path / "source" / "0.png")
    _png(tmp_path / "target" / "0.png")
    lines = ['{"source": "source/0.png", "target": "target/0.png", "prompt": "ok"}',
             '{"source": "source/0.png", "target": "target/0.png"',
             '{"source": "source/9.png", "target": "target/0.png", "prompt": "x"}',
             '{"source": "source/0.png", "target": "target/0.png", "prompt": ""}',
             '{"target": "target/0.png", "prompt": "x"}']
    (tmp_path / "prompt.json").write_text("\n".join(lines))
    with pytest.raises(DataError) as e:
        load_pairs(tmp_path)
    msg = str(e.value)
    for line in (2, 3, 4, 5):
        assert f"prompt.json line {line}" in msg
    assert "prompt.json line 1" not in msg and "9.png" in msg


def test_unusable_folders_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_pairs(tmp_path / "nope")
    with pytest.raises(DataError, match="no source/"):
        find_pairs(tmp_path)
    (tmp_path / "a.json").write_text("[]")
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(DataError, match="several JSON files"):
        find_pairs(tmp_path)


# ------------------------------------------------- style (RGB + extra map) and style2 (24-channel maps)

STYLE = HintLayout(3, extra_map=True)
STYLE2 = HintLayout(24)


def _style(tmp_path: Path, names=("a", "b")) -> Path:
    for i, n in enumerate(names):
        _png(tmp_path / "source" / f"{n}.png", value=40 + i)
        _png(tmp_path / "extra" / f"{n}.png", value=200 - i, channels=1)
        _png(tmp_path / "target" / f"{n}.png")
        (tmp_path / "target" / f"{n}.txt").write_text(f"style {n}")
    return tmp_path


def _map(path: Path, h: int = 4, w: int = 4, channels_first: bool = True, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).random((24, h, w) if channels_first else (h, w, 24)).astype(np.float32)
    np.save(path, arr)
    return path


def _style2(tmp_path: Path, names=("a", "b")) -> Path:
    for i, n in enumerate(names):
        _map(tmp_path / "source" / f"{n}.npy", channels_first=i % 2 == 0, seed=i)  # 4x4 = 32x32 px / 8
        _png(tmp_path / "target" / f"{n}.png")
        (tmp_path / "target" / f"{n}.txt").write_text(f"style2 {n}")
    return tmp_path


def test_style_pairs_take_their_extra_map_from_extra_or_the_json_record(tmp_path):
    data = _style(tmp_path / "plain")
    pairs, problems = load_pairs(data, hint=STYLE)
    assert problems == [] and [p.extra for p in pairs] == [data / "extra" / "a.png", data / "extra" / "b.png"]
    official = _style(tmp_path / "official", names=("0",))
    (official / "extra" / "0.png").rename(official / "extra" / "zero.png")
    (official / "prompt.json").write_text(json.dumps(
        {"source": "source/0.png", "target": "target/0.png", "extra": "extra/zero.png", "prompt": "p"}))
    pairs, problems = load_pairs(official, hint=STYLE)
    assert problems == [] and pairs[0].extra == official / "extra" / "zero.png"
    assert find_pairs(data)[0][0].extra is None  # other adapters ignore extra/


def test_bad_style_and_style2_data_is_reported_all_at_once(tmp_path):
    style = _style(tmp_path / "style", names=("good", "noextra", "small"))
    (style / "extra" / "noextra.png").unlink()
    _png(style / "extra" / "small.png", h=16, w=16, channels=1)
    with pytest.raises(DataError) as e:
        load_pairs(style, hint=STYLE)
    msg = str(e.value)
    assert len(e.value.problems) == 2 and "good" not in msg
    assert "no extra map extra/noextra.*" in msg and "extra map small.png is 16x16" in msg

    maps = _style2(tmp_path / "style2", names=("good", "wrongsize", "wrongchannels", "nan", "pickled", "png"))
    _map(maps / "source" / "wrongsize.npy", h=8, w=8)
    np.save(maps / "source" / "wrongchannels.npy", np.zeros((3, 4, 4), np.float32))
    np.save(maps / "source" / "nan.npy", np.full((24, 4, 4), np.nan, np.float32))
    np.save(maps / "source" / "pickled.npy", np.array([{"not": "an array"}], dtype=object), allow_pickle=True)
    (maps / "source" / "png.npy").unlink()
    _png(maps / "source" / "png.png")  # an image where a map belongs
    with pytest.raises(DataError) as e:
        load_pairs(maps, hint=STYLE2)
    msg = str(e.value)
    assert len(e.value.problems) == 5 and "good" not in msg, msg
    assert "condition map wrongsize.npy is 8x8 but target wrongsize.png is 32x32" in msg and "must be 4x4" in msg
    assert "shape (3, 4, 4), expected (24, h, w) or (h, w, 24)" in msg and "NaN or infinite" in msg
    assert "pickled.npy is unreadable" in msg and "no condition map source/png.npy" in msg


def test_cache_packs_the_style_extra_map_and_keeps_style2_maps_as_floats(tmp_path):
    def encode(pixels):
        return torch.zeros(pixels.shape[0], 4, pixels.shape[1] // 8, pixels.shape[2] // 8)

    style = _style(tmp_path / "style")
    pairs, _ = load_pairs(style, hint=STYLE)
    config = CacheConfig(size=(64, 64), hint_channels=3, base_identity="base0", extra_map=True)
    cache = TrainingCache(tmp_path / "cache", config)
    keys = sample_keys(pairs, config)
    cache.encode_samples(pairs, keys, encode)
    cache.encode_prompts([q for pair in pairs for q in pair.prompts], lambda p: torch.zeros(1, 77, 768))
    item = CachedPairs(cache, keys, pairs)[0]
    assert item["hint"].shape == (4, 64, 64) and item["hint"].dtype == torch.float32
    assert torch.allclose(item["hint"][:3], torch.full((3, 64, 64), 40 / 255))
    assert torch.allclose(item["hint"][3], torch.full((64, 64), 200 / 255))
    _png(style / "extra" / "a.png", value=9, channels=1)  # a changed extra map -> a new key for that pair
    assert sample_keys(pairs, config)[0] != keys[0] and sample_keys(pairs, config)[1] == keys[1]

    maps = _style2(tmp_path / "style2")
    pairs, _ = load_pairs(maps, hint=STYLE2)
    config = CacheConfig(size=(64, 64), hint_channels=24, base_identity="base0")
    cache = TrainingCache(tmp_path / "cache2", config)
    keys = sample_keys(pairs, config)
    cache.encode_samples(pairs, keys, encode)
    cache.encode_prompts([q for pair in pairs for q in pair.prompts], lambda p: torch.zeros(1, 77, 768))
    items = [CachedPairs(cache, keys, pairs)[i] for i in range(2)]
    assert all(it["hint"].shape == (24, 8, 8) and it["hint"].dtype == torch.float32 for it in items)
    for item, seed, first in zip(items, (0, 1), (True, False)):  # (24, h, w) and (h, w, 24) files alike
        arr = np.random.default_rng(seed).random((24, 4, 4) if first else (4, 4, 24)).astype(np.float32)
        arr = arr if first else np.moveaxis(arr, -1, 0)
        up = torch.from_numpy(arr).repeat_interleave(2, 1).repeat_interleave(2, 2)  # 4x4 -> 8x8 (cubic)
        assert float((item["hint"] - up).abs().mean()) < 0.2  # the map itself, resized to the latent size


def test_cli_condition_layouts(capsys):
    base = ["--ckpt", "x.safetensors", "--out", "o.safetensors", "--data", "d"]
    assert parse_args(base).hint_meaning == "sketch"
    assert parse_args(base + ["--hint-channels", "3"]).hint_meaning == "image"
    style = parse_args(base + ["--hint-channels", "3", "--extra-map"])
    assert style.extra_map and style.hint_meaning == "style"
    assert parse_args(base + ["--hint-channels", "24"]).hint_meaning == "style2"
    for bad, says in ((["--extra-map"], "--extra-map goes with an RGB condition"),
                      (["--hint-channels", "24", "--extra-map"], "--extra-map goes with an RGB condition")):
        with pytest.raises(SystemExit):
            parse_args(base + bad)
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--ckpt", "x", "--out", "o.safetensors", "--hint-channels", "24"])
    assert "need --data DIR" in capsys.readouterr().err
    assert HintLayout(24).network_fields() == {"hint_channels": 24, "extra_channels": 0, "downscale": 1}
    assert STYLE.network_fields() == {"hint_channels": 3, "extra_channels": 1, "downscale": 8}


# ----------------------------------------------------------------------------- demo set

def test_demo_set_is_deterministic_and_loads(tmp_path):
    a = write_demo_set(tmp_path / "a")
    b = write_demo_set(tmp_path / "b")
    pairs, problems = load_pairs(a)
    assert len(pairs) == NUM_PAIRS and not problems
    for sub in ("source", "target"):
        for f in sorted((a / sub).iterdir()):
            assert f.read_bytes() == (b / sub / f.name).read_bytes()
    sketch, image, caption = draw_pair(7)
    assert sketch.ndim == 2 and sketch.max() == 255 and image.shape == (512, 512, 3)
    assert caption == "a green triangle on a light blue background"
    # the outline matches the filled shape: the shape's bounding boxes agree
    fg = np.any(image != image[0, 0], axis=-1)
    ys, xs = np.nonzero(fg)
    sy, sx = np.nonzero(sketch > 127)
    assert abs(ys.min() - sy.min()) < 8 and abs(xs.max() - sx.max()) < 8
    assert len({draw_pair(i)[2] for i in range(NUM_PAIRS)}) == NUM_PAIRS


# ------------------------------------------------------------------------------- images

def test_training_size_keeps_aspect_in_multiples_of_64():
    assert training_size(512, 512, 512) == (512, 512)
    assert training_size(1024, 1024, 512) == (512, 512)
    assert training_size(600, 900, 512) == (448, 640)
    assert training_size(100, 100, 64) == (64, 64)
    with pytest.raises(ValueError, match="multiple of 64"):
        training_size(512, 512, 500)


def test_read_image_channels_alpha_and_16_bit(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 2] = 255      # red in BGR(A)
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0       # transparent pixel -> black
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    img = read_image(tmp_path / "a.png", 3)
    assert img.shape == (8, 8, 3) and tuple(img[1, 1]) == (255, 0, 0) and tuple(img[0, 0]) == (0, 0, 0)
    assert read_image(tmp_path / "a.png", 1).shape == (8, 8, 1)
    cv2.imwrite(str(tmp_path / "b.png"), np.full((4, 4), 65535, np.uint16))
    b = read_image(tmp_path / "b.png", 3)
    assert b.dtype == np.uint8 and b.max() == 255 and b.shape == (4, 4, 3)
    out = fit_image(np.zeros((100, 200, 1), np.uint8), (64, 64))
    assert out.shape == (64, 64, 1)


# ------------------------------------------------------------------------------ command line

def test_cli_help_documents_every_option_with_default():
    text = build_parser().format_help()
    for name in ("--ckpt", "--data", "--out", "--steps", "--resolution", "--batch-size", "--grad-accum", "--lr",
                 "--mixed-precision", "--gradient-checkpointing", "--seed", "--save-every", "--resume",
                 "--overwrite", "--skip-bad", "--omega", "--hint-channels", "--extra-map", "--epochs", "--warmup-steps",
                 "--validate-every", "--num-workers"):
        assert name in text
    for action in build_parser()._actions:
        if action.help and action.dest not in ("help",):
            assert "Default" in action.help or "Required" in action.help, action.dest


def test_cli_defaults_are_the_official_recipe_and_bad_values_fail(capsys):
    a = parse_args(["--ckpt", "x.safetensors", "--out", "o.safetensors"])
    assert (a.lr, a.resolution, a.mixed_precision, a.omega, a.hint_channels) == (1e-5, 512, "no", "paper", 1)
    assert a.batch_size * a.grad_accum == 16 and abs(a.generic_prompt_prob - 1 / 3) < 1e-9
    for bad in (["--resolution", "500"], ["--mixed-precision", "fp8"], ["--omega", "nope"],
                ["--hint-channels", "2"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            parse_args(["--ckpt", "x", "--out", "o.safetensors", *bad])
    with pytest.raises(SystemExit):
        parse_args(["--ckpt", "x", "--out", "o.pt"])
    assert checkpoint_dir("runs/my.safetensors") == Path("runs/my_checkpoints")


# ------------------------------------------------------------------------------ checkpoints

def test_checkpoint_roundtrip_rotation_and_atomicity(tmp_path):
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    for step in (1, 2, 3):
        tensors, rest = ckpt.flatten_state(net.state_dict(), opt.state_dict())
        ckpt.save_checkpoint(tmp_path, step, tensors, {"step": step, "optimizer": rest,
                                                       "rng": ckpt.capture_rng(gen)}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    # a half-written checkpoint (temporary name) is invisible, a corrupt one is skipped
    (tmp_path / ".tmp_step_00000009.123").mkdir()
    bad = tmp_path / "step_00000004"
    bad.mkdir()
    (bad / "tensors.safetensors").write_bytes(b"garbage")
    step, path, tensors, state = ckpt.load_latest_checkpoint(tmp_path)
    assert step == 3
    net_sd, opt_sd = ckpt.unflatten_state(tensors, state["optimizer"])
    for k, v in net.state_dict().items():
        assert torch.equal(net_sd[k], v)
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-3)
    opt2.load_state_dict(opt_sd)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) and float(a["step"]) == float(b["step"])
    ckpt.remove_stale_temporaries(tmp_path)
    assert not (tmp_path / ".tmp_step_00000009.123").exists()


def test_rng_capture_restores_every_stream():
    gen = torch.Generator().manual_seed(1)
    state = ckpt.capture_rng(gen)
    first = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    ckpt.restore_rng(state, gen)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item()) == first


# ------------------------------------------------------------------------------ data order

def test_batch_stream_resumes_exactly_and_shards_are_disjoint():
    full = BatchStream(10, 3, seed=4)
    it = iter(full)
    batches = [next(it) for _ in range(9)]  # crosses two epoch boundaries
    resumed = iter(BatchStream(10, 3, seed=4, start_batch=5))
    assert [next(resumed) for _ in range(4)] == batches[5:]
    assert sorted(sum(batches[:3], [])[:10]) == list(range(10)) or len(set(sum(batches[:4], [])[:10])) == 10
    r0, r1 = iter(BatchStream(10, 5, world_size=2, rank=0)), iter(BatchStream(10, 5, world_size=2, rank=1))
    assert sorted(next(r0) + next(r1)) == list(range(10))
    assert steps_for_epochs(16, 40, 4, 4) == 40


# ------------------------------------------------------------------------------ loss log

def test_loss_log_truncates_on_resume_and_draws_a_curve(tmp_path):
    log = LossLog(tmp_path / "loss.csv")
    for s in range(1, 6):
        log.append(s, 1.0 / s, 1e-5, 0.5, 2.0)
    log.close()
    log = LossLog(tmp_path / "loss.csv", resume_step=3)
    log.append(4, 0.9, 1e-5, 0.5, 2.0)
    log.close()
    rows = read_loss_log(tmp_path / "loss.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == pytest.approx(0.9)
    png = draw_loss_curve([r["step"] for r in rows], [r["loss"] for r in rows], tmp_path / "loss.png")
    img = cv2.imread(str(png))
    assert img is not None and img.shape == (500, 900, 3) and (img < 250).any()


def test_loss_log_keeps_the_validation_gap_columns_and_draws_them(tmp_path):
    log = LossLog(tmp_path / "loss.csv")
    for s in range(1, 7):
        gap = {"eps_own": 0.5 / s, "eps_swapped": 0.6, "eps_base": 0.7} if s % 2 == 0 else None
        log.append(s, 1.0 / s, 1e-5, 0.5, 2.0, gap)
    log.close()
    header = (tmp_path / "loss.csv").read_text().splitlines()[0]
    assert header == "step,loss,lr,seconds,samples_per_second," + ",".join(GAP_COLUMNS)
    log = LossLog(tmp_path / "loss.csv", resume_step=4)  # a resume keeps the earlier validation values
    log.close()
    rows = read_loss_log(tmp_path / "loss.csv")
    assert [r["eps_own"] for r in rows] == [None, pytest.approx(0.25), None, pytest.approx(0.125)]
    assert rows[1]["eps_swapped"] == pytest.approx(0.6) and rows[0]["eps_base"] is None
    series = gap_series(rows)
    assert list(series) == ["eps-MSE, own condition", "eps-MSE, swapped condition", "eps-MSE, base alone"]
    assert series["eps-MSE, own condition"] == ([2, 4], [pytest.approx(0.25), pytest.approx(0.125)])
    plain = draw_loss_curve([r["step"] for r in rows], [r["loss"] for r in rows], tmp_path / "plain.png")
    drawn = draw_loss_curve([r["step"] for r in rows], [r["loss"] for r in rows], tmp_path / "gap.png",
                            series=series)
    green = lambda img: ((img[..., 1] > 130) & (img[..., 0] < 80) & (img[..., 2] < 80)).sum()  # noqa: E731
    assert green(cv2.imread(str(drawn))) > 50 and green(cv2.imread(str(plain))) == 0
    # a log written before the gap columns existed still reads, with None in them
    old = tmp_path / "old.csv"
    old.write_text("step,loss,lr,seconds,samples_per_second\n1,0.5,1e-05,0.1,2.0\n")
    assert read_loss_log(old) == [{"step": 1, "loss": 0.5, "lr": 1e-5, "seconds": 0.1, "samples_per_second": 2.0,
                                   "eps_own": None, "eps_swapped": None, "eps_base": None}]


# ------------------------------------------------------------------------------ cache

def test_cache_reuses_unchanged_pairs_and_reencodes_changed_ones(tmp_path):
    data = _plain(tmp_path / "data", names=("a", "b"))
    pairs, _ = load_pairs(data)
    calls = []

    def encode(pixels):
        calls.append(pixels.shape[0])
        assert pixels.shape[1:] == (64, 64, 3) and 0 <= pixels.min() and pixels.max() <= 1
        return torch.ones(pixels.shape[0], 4, 8, 8) * pixels.mean()

    config = CacheConfig(size=(64, 64), hint_channels=1, base_identity="base0")
    cache = TrainingCache(tmp_path / "cache", config)
    keys = sample_keys(pairs, config)
    assert cache.encode_samples(pairs, keys, encode) == 2
    assert cache.encode_samples(pairs, sample_keys(pairs, config), encode) == 0
    _png(data / "target" / "b.png", value=7)  # content change -> new key for b only
    keys2 = sample_keys(pairs, config)
    assert keys2[0] == keys[0] and keys2[1] != keys[1]
    assert cache.encode_samples(pairs, keys2, encode) == 1
    other = CacheConfig(size=(64, 64), hint_channels=1, base_identity="base1")
    assert sample_keys(pairs, other)[0] != keys[0]
    prompts = ["x", "y", "x"] + [q for pair in pairs for q in pair.prompts]
    assert cache.encode_prompts(prompts, lambda p: torch.full((1, 77, 768), float(len(p)))) == 4
    assert cache.load_text("a photo of a")[0, 0, 0] == len("a photo of a")
    item = CachedPairs(cache, keys2, pairs)[0]
    assert item["latent"].shape == (4, 8, 8) and item["hint"].shape == (1, 64, 64)
    assert item["hint"].max() <= 1.0 and item["hint"].dtype == torch.float32
    batch = collate([item, item])
    assert batch["latent"].shape == (2, 4, 8, 8) and len(batch["conds"]) == 2


# ------------------------------------------------------------------------------ entry script

def _entry_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bps_train_entry_test", ROOT / "train" / "train_bps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_finds_the_comfyui_it_is_installed_in_then_comfyui_path(tmp_path, monkeypatch):
    entry = _entry_script()

    def fake_comfyui(root: Path) -> Path:
        (root / "comfy").mkdir(parents=True)
        (root / "comfy" / "model_patcher.py").write_text("")
        (root / "nodes.py").write_text("")
        return root

    installed = fake_comfyui(tmp_path / "ComfyUI")
    pack = installed / "custom_nodes" / "ComfyUI-BPS"
    pack.mkdir(parents=True)
    other = fake_comfyui(tmp_path / "other")
    monkeypatch.setenv("COMFYUI_PATH", str(other))
    assert entry.find_comfyui(pack) == installed
    loose = tmp_path / "checkout"
    loose.mkdir()
    assert entry.find_comfyui(loose) == other.resolve()
    monkeypatch.delenv("COMFYUI_PATH")
    with pytest.raises(SystemExit, match="cannot find ComfyUI.*COMFYUI_PATH"):
        entry.find_comfyui(loose)
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match="is not a ComfyUI folder"):
        entry.find_comfyui(loose)


def test_help_works_without_comfyui(monkeypatch):
    import subprocess
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "train_bps.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--mixed-precision" in proc.stdout and "Default: 512" in proc.stdout
