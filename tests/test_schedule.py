"""Omega presets, multipliers, overrides, curves, ranges and the error messages (pure functions)."""

import math

import pytest

from bps.errors import ScheduleError
from bps.ports import NUM_PORTS, PAPER_OMEGA, PORTS
from bps.schedule import (Curve, OmegaSpec, make_omega_spec, make_schedule, parse_keyframes, parse_overrides,
                          progress_from_timestep)

ENC = [p.index for p in PORTS if p.group == "encoder"]
MID = [p.index for p in PORTS if p.group == "middle"]
DEC = [p.index for p in PORTS if p.group == "decoder"]
ADAPTER = tuple(float(i + 1) for i in range(NUM_PORTS))  # distinct values expose mix-ups


@pytest.mark.parametrize("preset, on", [
    ("paper", ENC + MID + DEC), ("EMD", ENC + MID + DEC), ("E", ENC), ("M", MID), ("D", DEC),
    ("EM", ENC + MID), ("MD", MID + DEC),
])
def test_presets_keep_adapter_defaults_of_named_groups(preset, on):
    base = OmegaSpec(preset=preset).base_weights(ADAPTER)
    assert base == tuple(ADAPTER[i] if i in on else 0.0 for i in range(NUM_PORTS))


def test_uniform_and_paper_defaults():
    assert OmegaSpec("uniform").base_weights(PAPER_OMEGA) == (1.0,) * NUM_PORTS
    assert OmegaSpec().base_weights(PAPER_OMEGA) == PAPER_OMEGA
    assert PAPER_OMEGA[:8] == (16, 16, 8, 8, 4, 4, 2, 2) and PAPER_OMEGA[8] == 16 and set(PAPER_OMEGA[9:]) == {1}


def test_group_multipliers_then_overrides():
    spec = make_omega_spec("paper", encoder=0.5, middle=2.0, decoder=0.0, overrides="input_1=3, 20=7")
    base = spec.base_weights(ADAPTER)
    assert base[0] == 3.0 and base[1] == ADAPTER[1] * 0.5
    assert base[8] == ADAPTER[8] * 2.0
    assert base[9:20] == (0.0,) * 11 and base[20] == 7.0


def test_overrides_by_name_index_and_full_vector():
    assert parse_overrides("middle=0, output_11=2, 0=1.5") == ((0, 1.5), (8, 0.0), (20, 2.0))
    assert parse_overrides("  ") == ()
    assert parse_overrides("middle=1, middle=4") == ((8, 4.0),)
    full = ", ".join(str(i) for i in range(NUM_PORTS))
    assert parse_overrides(full) == tuple((i, float(i)) for i in range(NUM_PORTS))


@pytest.mark.parametrize("text, quoted", [
    ("input_3=1", "unknown port 'input_3'"),
    ("21=1", "out of range"),
    ("middle=abc", "'abc'"),
    ("middle=1=2", '"middle=1=2"'),
    ("1, 2, 3", "exactly 21 weights"),
    ("middle=inf", "finite"),
])
def test_bad_overrides_quote_the_bad_part(text, quoted):
    with pytest.raises(ScheduleError, match=quoted.replace("(", r"\(")):
        parse_overrides(text)


@pytest.mark.parametrize("kind, p, value", [
    ("constant", 0.3, 1.0), ("linear_down", 0.0, 1.0), ("linear_down", 0.25, 0.75), ("linear_down", 1.0, 0.0),
    ("linear_up", 0.25, 0.25), ("cosine", 0.0, 1.0), ("cosine", 0.5, 0.5), ("cosine", 1.0, 0.0),
])
def test_curves(kind, p, value):
    assert Curve.parse(kind)(p) == pytest.approx(value, abs=1e-12)


def test_keyframes_interpolate_and_hold_ends():
    curve = Curve.parse("keyframes", "0.6:0.4, 0.2:1.0; 0.8:0.0")  # unsorted input is sorted
    assert curve.points == ((0.2, 1.0), (0.6, 0.4), (0.8, 0.0))
    assert curve(0.0) == 1.0 and curve(0.2) == 1.0
    assert curve(0.4) == pytest.approx(0.7)
    assert curve(0.6) == pytest.approx(0.4) and curve(0.7) == pytest.approx(0.2)
    assert curve(0.8) == 0.0 and curve(1.0) == 0.0
    assert Curve.parse("keyframes", "0.5:2")(0.9) == 2.0


@pytest.mark.parametrize("text, quoted", [
    ("0.0:1.0, 0.6-0.4", '"0.6-0.4" is not "progress:value"'),
    ("0.0:1.0, 1.5:0", '"1.5:0": progress must lie in [0, 1]'),
    ("0.2:1, 0.2:0", '"0.2:0": progress 0.2 is given twice'),
    ("0.2:x", "'x'"),
    ("0.2:nan", "finite"),
    ("", "keyframes are empty"),
])
def test_bad_keyframes_quote_the_bad_part(text, quoted):
    with pytest.raises(ScheduleError) as err:
        parse_keyframes(text)
    assert quoted in str(err.value)


def test_unknown_preset_and_curve():
    with pytest.raises(ScheduleError, match="unknown omega preset 'ED'"):
        make_omega_spec("ED")
    with pytest.raises(ScheduleError, match="unknown curve 'step'"):
        make_omega_spec(curve="step")


def test_weights_at_range_edges_are_inclusive():
    sched = make_schedule(ADAPTER, strength=0.5, start=0.2, end=0.6)
    assert sched.weights_at(0.2) == tuple(w * 0.5 for w in ADAPTER)
    assert sched.weights_at(0.6) == tuple(w * 0.5 for w in ADAPTER)
    assert sched.weights_at(math.nextafter(0.2, 0)) == (0.0,) * NUM_PORTS
    assert sched.weights_at(math.nextafter(0.6, 1)) == (0.0,) * NUM_PORTS
    assert sched.is_active_at(0.4) and not sched.is_active_at(0.7)


def test_zero_length_range_is_active_only_at_that_point():
    sched = make_schedule(ADAPTER, start=0.5, end=0.5)
    assert sched.is_active_at(0.5)
    assert not sched.is_active_at(0.49) and not sched.is_active_at(0.51)


def test_inactive_cases():
    assert not make_schedule(ADAPTER, strength=0.0).is_active_at(0.5)
    assert not make_schedule(ADAPTER, make_omega_spec(curve="linear_down")).is_active_at(1.0)
    assert not make_schedule(ADAPTER, make_omega_spec(encoder=0, middle=0, decoder=0)).is_active_at(0.3)


def test_curve_and_strength_multiply():
    sched = make_schedule(ADAPTER, make_omega_spec(curve="keyframes", keyframes="0:1, 1:0"), strength=2.0)
    assert sched.weights_at(0.25) == pytest.approx(tuple(w * 2.0 * 0.75 for w in ADAPTER))


@pytest.mark.parametrize("kwargs, match", [
    ({"start": 0.7, "end": 0.3}, "after end_percent"),
    ({"start": -0.1}, r"must lie in \[0, 1\]"),
    ({"strength": float("nan")}, "strength must be a finite"),
])
def test_bad_ranges(kwargs, match):
    with pytest.raises(ScheduleError, match=match):
        make_schedule(ADAPTER, **kwargs)


def test_adapter_omega_must_have_one_weight_per_port():
    with pytest.raises(ScheduleError, match="expected one per port"):
        make_schedule([1.0] * 20)


def test_specs_are_hashable_and_compare_by_value():
    a = make_omega_spec("EM", 1, 2, 3, "middle=1", "keyframes", "0:1, 1:0")
    b = make_omega_spec("EM", 1, 2, 3, "middle=1", "keyframes", "0:1,1:0")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1


def test_progress_from_timestep_matches_comfyui_percent():
    assert progress_from_timestep(999) == 0.0 and progress_from_timestep(0) == 1.0
    assert progress_from_timestep(499.5) == pytest.approx(0.5)
    assert progress_from_timestep(1200) == 0.0
