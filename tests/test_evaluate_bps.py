"""train/evaluate_bps.py against the real ComfyUI: the command end to end on a tiny held-out set
(random-weight SD1.5 checkpoint ``sd15_ckpt``, 64x64 pixels), and its refusals of bad input."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import comfy_host

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def ev(comfyui_host):
    pack = comfy_host.trainer_pack()
    mods = {m: importlib.import_module(f"{pack.__name__}.{m}") for m in (
        "train.evaluation", "train.eval_cli", "train.base_model", "bps")}
    return types.SimpleNamespace(evaluation=mods["train.evaluation"], cli=mods["train.eval_cli"],
                                 base_model=mods["train.base_model"], bps=mods["bps"])


def _held_out(folder: Path, indices=(100, 101, 102), size: int = 64) -> Path:
    from train.demo_data import draw_pair  # noqa: PLC0415 - plain pure module
    for i in indices:
        sketch, image, caption = draw_pair(i, size)
        (folder / "source").mkdir(parents=True, exist_ok=True)
        (folder / "target").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / "source" / f"{i}.png"), sketch)
        cv2.imwrite(str(folder / "target" / f"{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        (folder / "target" / f"{i}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="module")
def adapter_file(ev, tmp_path_factory) -> Path:
    """A full-width SD1.5 sketch adapter whose output convs are non-zero (so it steers), trained at 64 px
    as its provenance says (the evaluation picks that resolution)."""
    path = tmp_path_factory.mktemp("adapter") / "sketch.safetensors"
    net = comfy_host.steering_network(ev.bps, seed=1)
    ev.bps.save_adapter(path, net, provenance={"resolution": "64x64"})
    del net
    comfy_host.release_memory()
    return path


def test_cli_end_to_end_writes_gap_table_grid_and_edge_scores(ev, sd15_ckpt, adapter_file, tmp_path):
    data = _held_out(tmp_path / "held_out")
    out = tmp_path / "eval"
    cmd = [sys.executable, str(ROOT / "train" / "evaluate_bps.py"), "--ckpt", str(sd15_ckpt), "--adapter",
           str(adapter_file), "--data", str(data), "--out", str(out), "--per-band", "1", "--samples", "2",
           "--seeds", "1", "--steps", "1", "--batch-size", "12"]  # one UNet call per eps-MSE pass
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for bar in ("encoding held-out pairs", "eps-MSE base / own / swapped", "sampling base / steered"):
        assert bar in proc.stderr, bar  # tqdm progress bars
    report = json.loads((out / "report.json").read_text())
    gap = report["gap"]
    assert report["pairs"] == 3 and report["size"] == [64, 64] and report["score_kind"] == "edges"
    assert [b["band"] for b in gap["bands"]] == [[0, 250], [250, 500], [500, 750], [750, 1000]]
    assert gap["plan"]["timesteps"] == [125, 375, 625, 875]
    per_pair = gap["per_pair"]
    assert np.array(per_pair["own"]).shape == (3, 4)
    assert per_pair["own"] != per_pair["base"] and per_pair["own"] != per_pair["swapped"], "the adapter steers"
    assert sorted(gap["swap"]) == [0, 1, 2] and all(s != i for i, s in enumerate(gap["swap"]))
    for name in ("base, own condition", "steered, own condition", "steered, swapped condition (chance)"):
        f1 = report["scores"][name]["f1"]
        assert f1["n"] <= 2 and (f1["n"] == 0 or 0 <= f1["mean"] <= 1)
    md = (out / "report.md").read_text()
    assert "| t band | base eps-MSE | own cond. | swapped cond." in md and "| 750-1000 |" in md
    assert "Edge agreement" in md and "![grid](grid.png)" in md
    assert md.splitlines()[0] in proc.stdout
    grid = cv2.imread(str(out / "grid.png"))
    # header + 2 rows of 128 px cells (64 px enlarged); condition | target | base s0 | steered s0
    assert grid.shape == (26 + 2 * 130, 4 * 130, 3)


def _args(ev, **kw):
    argv = []
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return ev.cli.parse_args(argv)


def test_bad_input_is_refused_with_the_fix_before_the_base_is_loaded(ev, adapter_file, tmp_path):
    """The checkpoint path does not exist: an error about anything else shows it came first."""
    missing_ckpt = str(tmp_path / "no_such_base.safetensors")
    run, EvalError = ev.evaluation.run, ev.evaluation.EvalError
    data = _held_out(tmp_path / "data")
    with pytest.raises(EvalError, match="adapter .*nope.safetensors does not exist; pass the .safetensors file"):
        run(_args(ev, ckpt=missing_ckpt, adapter=tmp_path / "nope.safetensors", data=data))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(EvalError, match="broken.safetensors"):
        run(_args(ev, ckpt=missing_ckpt, adapter=broken, data=data))
    with pytest.raises(EvalError, match="held-out folder .*missing does not exist; pass --data DIR"):
        run(_args(ev, ckpt=missing_ckpt, adapter=adapter_file, data=tmp_path / "missing"))
    (data / "target" / "101.png").write_bytes(b"not a png")
    with pytest.raises(EvalError, match=r"(?s)1 problem\(s\) in held-out data.*101.png is unreadable.*--skip-bad"):
        run(_args(ev, ckpt=missing_ckpt, adapter=adapter_file, data=data))
    (data / "target" / "102.png").unlink()
    with pytest.raises(EvalError, match="1 usable pair.*needs at least 2"):
        argv = ["--ckpt", missing_ckpt, "--adapter", str(adapter_file), "--data", str(data), "--skip-bad"]
        run(ev.cli.parse_args(argv))
    (data / "target" / "101.png").unlink()
    _held_out(data, indices=(101, 102))
    with pytest.raises(ev.base_model.BaseModelError, match="no_such_base.safetensors does not exist"):
        run(_args(ev, ckpt=missing_ckpt, adapter=adapter_file, data=data))
    with pytest.raises(SystemExit):
        ev.cli.parse_args(["--ckpt", "x", "--adapter", "a.pt", "--data", "d"])


def test_an_adapter_for_another_unet_is_refused_naming_both(ev, sd15, tmp_path):
    small = tmp_path / "small.safetensors"
    shape = importlib.import_module(f"{ev.bps.__name__}.unet_shape").UNetShape.like_sd15(model_channels=32)
    ev.bps.save_adapter(small, ev.bps.BPSNetwork(ev.bps.BPSConfig.for_unet(shape)), unet=shape)
    base = ev.base_model.BaseModels(model=sd15, clip=None, vae=None, path=tmp_path / "sd15.safetensors")
    with pytest.raises(ev.evaluation.EvalError, match=r"adapter small.safetensors does not fit the base "
                                                       r"sd15.safetensors: .*32"):
        ev.evaluation.run(_args(ev, ckpt=tmp_path / "sd15.safetensors", adapter=small,
                                data=_held_out(tmp_path / "data")), base=base)


def test_score_kind_follows_the_adapter(ev):
    cfg = ev.bps.BPSConfig
    kind = ev.evaluation.score_kind
    auto = types.SimpleNamespace(score="auto")
    make = lambda meaning, **c: types.SimpleNamespace(hint_meaning=meaning, config=cfg(**c))  # noqa: E731
    assert kind(auto, make("sketch")) == "edges"
    assert kind(auto, make("segmentation", hint_channels=3)) == "regions"
    assert kind(auto, make("layout", hint_channels=3)) == "regions"
    assert kind(auto, make("style", hint_channels=3, extra_channels=1)) == "none"
    assert kind(auto, make("style2", hint_channels=24, downscale=1)) == "none"
    assert kind(auto, make("my lines")) == "edges" and kind(auto, make("my colours", hint_channels=3)) == "regions"
    assert kind(types.SimpleNamespace(score="regions"), make("sketch")) == "regions"


def test_a_folder_without_sources_gets_the_adapters_recorded_preprocessor(ev, tmp_path):
    """An adapter trained with --condition sketch: held-out targets alone, conditions made as in training."""
    evaluation = ev.evaluation
    data = _held_out(tmp_path / "data")
    recorded = types.SimpleNamespace(condition={"kind": "sketch", "params": {}}, path="a.safetensors")
    args = types.SimpleNamespace(data=str(data), prompt=None, skip_bad=False, max_pairs=50)
    assert evaluation.condition_from_targets(args, recorded) is None, "source/ present: its files are the conditions"
    import shutil
    shutil.rmtree(data / "source")
    spec = evaluation.condition_from_targets(args, recorded)
    assert spec.kind == "sketch"
    pairs = evaluation._held_out_pairs(args, evaluation.HintLayout(1), spec)
    assert len(pairs) == 3 and all(p.source is None for p in pairs)
    assert evaluation.condition_from_targets(args, types.SimpleNamespace(condition=None, path="b")) is None
    with pytest.raises(evaluation.EvalError, match="preprocessor this version cannot run"):
        evaluation.condition_from_targets(args, types.SimpleNamespace(condition={"kind": "nope"}, path="c"))
