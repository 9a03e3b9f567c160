"""bench/bench_server.py's bookkeeping: prompts, run order and the ratio tables (no server needed)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

bench_server = pytest.importorskip("bench.bench_server", reason="bench/bench_server.py needs torch")


def test_rounds_alternate_so_drift_favours_no_workflow():
    order = bench_server.WORKFLOWS
    got = bench_server.rounds(order, 4)
    assert got == [order, tuple(reversed(order)), order, tuple(reversed(order))]
    # Over two rounds every workflow's mean position is the same.
    positions = {k: sum(r.index(k) for r in got[:2]) for k in order}
    assert len(set(positions.values())) == 1


def test_prompts_share_one_sketch_except_the_new_sketch_workflow():
    p = {k: [bench_server.prompt(k, seed, 256, 3, 7.5) for seed in (1, 2)] for k in bench_server.WORKFLOWS}
    assert "5" not in p["plain"][0] and p["plain"][0]["7"]["inputs"]["model"] == ["1", 0]
    assert p["bps"][0]["5"]["inputs"]["image"] == p["bps"][1]["5"]["inputs"]["image"] == bench_server.IMAGE
    new = [q["5"]["inputs"]["image"] for q in p["bps_new_sketch"]]
    assert new[0] != new[1] and bench_server.IMAGE not in new
    for kind in ("bps", "bps_new_sketch"):
        assert p[kind][0]["9"]["class_type"] == "BPSApply" and p[kind][0]["7"]["inputs"]["model"] == ["9", 0]
    assert p["controlnet"][0]["7"]["inputs"]["positive"] == ["9", 0]
    assert {q["7"]["inputs"]["seed"] for q in p["bps"]} == {1, 2}


def test_table_reports_medians_as_ratios_to_plain():
    Run = bench_server.Run
    runs = [Run("plain", 10.0, [2.0, 2.0], 0), Run("plain", 12.0, [3.0], 0),
            Run("bps", 11.0, [2.2], 1), Run("bps_new_sketch", 14.0, [2.8, 2.8], 1),
            Run("controlnet", 20.0, [4.0], 1)]
    lines = bench_server.table("t", runs).splitlines()
    rows = {line.split(" | ")[0]: line.split(" | ") for line in lines[2:]}
    assert rows["plain"][1:4] == ["2", "11.00", "1.000"]
    assert rows["BPS"][3] == "1.000" and rows["BPS"][6] == "1.100"
    assert rows["BPS, new sketch"][5:7] == ["2.800", "1.400"]
    assert rows["ControlNet"][3] == "1.818" and rows["ControlNet"][7] == "1.0"
    assert rows["plain"][8:] == ["-", "-"]  # no first-step figures given


def test_a_prompt_splits_into_outside_the_sampler_first_step_and_steps():
    Run = bench_server.Run
    run = Run("bps", 10.0, [2.0, 2.5], 0, first=4.0)
    assert run.outside == pytest.approx(1.5)
    runs = [Run(k, 10.0, [2.0], 0, first=f) for k, f in
            [("plain", 3.0), ("plain", 5.0), ("bps", 6.0), ("bps_new_sketch", 4.0), ("controlnet", 4.0)]]
    rows = {line.split(" | ")[0]: line.split(" | ") for line in bench_server.table("t", runs).splitlines()[2:]}
    assert rows["plain"][8:] == ["4.00", "4.00"]  # medians: first step (3, 5), outside (5, 3)
    assert rows["BPS"][8:] == ["6.00", "2.00"]


def test_each_base_names_its_own_checkpoint_adapter_and_controlnet():
    bases = bench_server.BASES
    sd15 = bench_server.prompt("bps", 1, 256, 3, 7.5)  # the default base is SD1.5, as before --base
    assert sd15 == bench_server.prompt("bps", 1, 256, 3, 7.5, bases["sd15"])
    assert sd15["1"]["inputs"]["ckpt_name"] == "sd15.safetensors"
    assert sd15["6"]["inputs"]["adapter_name"] == "bench_sketch.safetensors"
    xl = {k: bench_server.prompt(k, 1, 256, 3, 7.5, bases["sdxl"]) for k in bench_server.WORKFLOWS}
    assert {p["1"]["inputs"]["ckpt_name"] for p in xl.values()} == {"sdxl.safetensors"}
    assert xl["bps"]["6"]["inputs"]["adapter_name"] == "bench_sketch_sdxl.safetensors"
    assert xl["controlnet"]["6"]["inputs"]["control_net_name"] == "bench_control_sdxl.safetensors"
    names = [getattr(b, f) for b in bases.values() for f in ("checkpoint_name", "adapter_name", "controlnet_name")]
    assert len(set(names)) == len(names)  # one --keep folder can hold both bases' files


def test_the_sdxl_adapter_follows_the_port_rule_for_sdxl():
    bps = pytest.importorskip("bps")
    xl, sd15 = bench_server.BASES["sdxl"], bench_server.BASES["sd15"]
    assert xl.unet_shape(bps) == bps.SDXL_SHAPE and sd15.unet_shape(bps) == bps.SD15_SHAPE
    assert len(bps.port_map(xl.unet_shape(bps)).names) == 16
    assert bps.BPSConfig.for_unet(xl.unet_shape(bps)).channel_mult == (1, 2, 4)


def test_a_table_of_some_workflows_lists_only_those():
    Run = bench_server.Run
    runs = [Run("plain", 10.0, [2.0], 0, first=3.0), Run("bps", 9.0, [2.1], 0, first=3.0)]
    lines = bench_server.table("t", runs).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["plain", "BPS"]
    assert lines[3].split(" | ")[3] == "0.900"
