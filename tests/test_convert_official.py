"""Official BPS-v1-1 checkpoints of all four official configurations: key mapping against the official
key list, omega, parameter accounting, parity with an independent reference forward, input formats,
and refusals (in-process and through the CLI).

Every "official" state dict here is built from the official key list (tests/official_checkpoints.py:
every key and shape of each configuration), never from this pack's network."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bps import AdapterError, BPSConfig, BPSNetwork, load_adapter, read_adapter_metadata
from bps.convert_official import (PREFIX, convert_official, convert_official_state_dict, infer_config,
                                  read_checkpoint)
from bps.ports import PAPER_OMEGA
from official_checkpoints import (CONFIGS, HINTS, SCALE, lightning_checkpoint, official_numel,
                                  official_res_weights, official_shapes, official_state_dict)
from official_forward import reference_ports

ROOT = Path(__file__).resolve().parents[1]
RES = [0.5 + i for i in range(14)]  # distinct values: res_weights[i] -> encoder block i, [13] -> middle
ENCODER_BLOCKS = (1, 2, 4, 5, 7, 8, 10, 11)
DISTINCT_OMEGA = [RES[b] for b in ENCODER_BLOCKS] + [RES[13]] + [1.0] * 12
UNUSED_ZERO_BLOCKS = ("zero_blocks.0.", "zero_blocks.3.", "zero_blocks.6.", "zero_blocks.9.")
#: The scaled-down official sketch network (widths / 10) that most tests use.
TINY = BPSConfig(model_channels=32, time_embed_dim=128)
FIRST_CONV_INPUTS = {"sketch": 64, "layout": 192, "style": 256, "style2": 24}


# Tiny tensors: one thread (conftest.py's one_thread) runs them faster than a thread pool.
pytestmark = pytest.mark.usefixtures("one_thread", "official_keys")


def official_omega(name):
    """The omega the official network of ``name`` applies: res_weights of blocks 1, 2, 4, 5, 7, 8, 10, 11,
    the last one for the middle, 1 for the decoder."""
    res = official_res_weights(name)
    return [res[b] for b in ENCODER_BLOCKS] + [res[-1]] + [1.0] * 12


def sketch_state_dict(**kwargs):
    return official_state_dict("sketch", **kwargs)


def lightning_ckpt(path, control):
    """Save ``control`` as the official training code would: inside a Lightning checkpoint with the whole SD."""
    torch.save(lightning_checkpoint(control), path)
    return path


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory, official_keys):
    """A scaled official sketch Lightning checkpoint shared by tests that only read it."""
    return lightning_ckpt(tmp_path_factory.mktemp("official") / "official.ckpt", sketch_state_dict(res=RES))


def _hint_inputs(name, batch=2, latent=8, seed=2):
    """(hint, extra) as the official code feeds config ``name``, for a ``latent`` x ``latent`` latent."""
    channels, extra_channels, unshuffle = HINTS[name]
    g = torch.Generator().manual_seed(seed)
    hint = torch.rand(batch, channels, latent * unshuffle, latent * unshuffle, generator=g)
    extra = torch.rand(batch, extra_channels, latent * 8, latent * 8, generator=g) if extra_channels else None
    return hint, extra


# ---- the official key list itself --------------------------------------------------------------

def test_the_key_list_holds_the_four_official_configurations():
    for name, in_channels in FIRST_CONV_INPUTS.items():
        shapes = official_shapes(name)
        assert shapes["input_blocks.0.weight"] == (320, in_channels, 3, 3), name
        assert sum(torch.Size(s).numel() for s in shapes.values()) == official_numel(name), name
        assert len(official_res_weights(name)) == 14 and "zero_blocks.12.weight" in shapes
    assert official_omega("layout") == [1.0] * 21
    assert official_omega("sketch") == official_omega("style") == official_omega("style2") == list(PAPER_OMEGA)


# ---- the network matches the official state dict at the official size ----------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_network_is_the_official_state_dict_minus_what_the_official_forward_never_uses(name):
    """At the official size, from the key list alone (tensors that cost no memory): every parameter of
    ours is an official key with the official shape, and the converter drops exactly zero_blocks 0, 3, 6,
    9 and the 14 res_weights; the numbers add up to the key list's total."""
    shapes = official_shapes(name)
    # expand() of one scalar: full-size shapes at no memory cost
    control = {k: torch.zeros(()).expand(s) for k, s in shapes.items()}
    control.update({f"res_weights.{i}": torch.tensor(w) for i, w in enumerate(official_res_weights(name))})
    state, omega, config, dropped = convert_official_state_dict(control, f"{name}.ckpt")
    assert config.is_sd15_layout and config.in_channels == FIRST_CONV_INPUTS[name]
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in BPSNetwork(config).state_dict().items()}
    assert list(ours) == [k for k in shapes if k in ours]  # same names, official order
    assert all(ours[k] == shapes[k] for k in ours)
    assert set(state) == set(ours) and all(state[k] is control[k] for k in state)
    assert set(dropped) == {k for k in shapes if k.startswith(UNUSED_ZERO_BLOCKS + ("res_weights.",))}
    assert len(dropped) == 8 + 14 and set(ours) | set(dropped) == set(shapes)
    assert sum(torch.Size(s).numel() for s in ours.values()) + sum(
        torch.Size(shapes[k]).numel() for k in dropped) == official_numel(name)
    assert omega == official_omega(name)


def test_official_parameter_count_is_fully_accounted_for():
    """The official SD1.5 sketch network holds 692,370,894 numbers: ours plus what is dropped on purpose."""
    with torch.device("meta"):
        net = BPSNetwork(BPSConfig())
    ours = sum(p.numel() for p in net.parameters())
    zero_blocks = sum(w * w * 9 + w for w in (320, 320, 640, 1280))  # zero_blocks 0, 3, 6, 9: 3x3 conv + bias
    assert ours + zero_blocks + 14 == official_numel("sketch") == 692_370_894
    assert (ours, zero_blocks) == (672_093_120, 20_277_760)


# ---- conversion and parity, all four configurations --------------------------------------------

@pytest.mark.parametrize("form", ["lightning", "bare"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_network_returns_official_outputs_divided_by_weights(tmp_path, name, form):
    """Convert (fp32) a Lightning checkpoint with the SD model beside it, or a bare control_model dict;
    the adapter's network returns the official port outputs divided by the official weights."""
    control = official_state_dict(name, seed=1)
    src = tmp_path / ("official.ckpt" if form == "lightning" else "control_model.pth")
    torch.save(lightning_checkpoint(control) if form == "lightning" else control, src)
    out = tmp_path / "p.safetensors"
    report = convert_official(src, out, dtype=torch.float32)
    adapter = load_adapter(out)
    assert report.ignored == (4 if form == "lightning" else 0)
    assert adapter.omega == official_omega(name)  # layout: all 1, the others top-heavy
    ours = adapter.network.state_dict()
    assert all(torch.equal(ours[k], control[k]) for k in ours)  # bit for bit

    hint, extra = _hint_inputs(name)
    emb = torch.randn(2, TINY.time_embed_dim, generator=torch.Generator().manual_seed(3))
    official = reference_ports(control, hint, emb, extra, unshuffle=HINTS[name][2])
    with torch.no_grad():
        got = adapter.network(hint if extra is None else torch.cat([hint, extra], dim=1), emb)
    assert len(got) == len(official) == 21
    for i, (a, b) in enumerate(zip(got, official)):
        expected = b / adapter.omega[i]
        assert a.shape == expected.shape and expected.abs().max() > 0.01, i
        rel = float((a - expected).abs().max() / expected.abs().max())
        assert rel < 1e-5, (name, i, rel)


@pytest.mark.parametrize("name, meaning", [("sketch", "sketch"), ("layout", "layout"), ("style", "style"),
                                           ("style2", "style2")])
def test_hint_layout_and_widths_are_inferred(name, meaning, tmp_path):
    control = official_state_dict(name)
    hint_channels, extra_channels, unshuffle = HINTS[name]
    cfg = BPSConfig(hint_channels=hint_channels, extra_channels=extra_channels, downscale=unshuffle,
                    model_channels=320 // SCALE, time_embed_dim=1280 // SCALE)
    assert control["input_blocks.0.weight"].shape[1] == FIRST_CONV_INPUTS[name] == cfg.in_channels
    assert infer_config(control) == cfg
    path = tmp_path / "in.safetensors"
    from safetensors.torch import save_file
    save_file({PREFIX + k: v for k, v in control.items()}, str(path))  # a .safetensors of the full-model keys
    report = convert_official(path, tmp_path / "o.safetensors")
    meta = read_adapter_metadata(tmp_path / "o.safetensors")
    assert report.config == cfg and meta["hint_meaning"] == meaning and meta["hint_channels"] == hint_channels
    assert CONFIGS[name] in str(report)
    assert load_adapter(tmp_path / "o.safetensors").network.dtype == torch.float16  # the default dtype


def test_every_official_key_lands_where_it_should(tmp_path, official_ckpt):
    control = sketch_state_dict(res=RES)
    out = tmp_path / "a.safetensors"
    report = convert_official(official_ckpt, out, dtype=torch.float32)
    adapter = load_adapter(out)
    ours = adapter.network.state_dict()
    kept = [k for k in control if k in ours]
    assert len(kept) == len(ours) == report.kept  # every tensor of the network comes from the checkpoint
    for key in kept:
        assert ours[key].dtype == torch.float32 and torch.equal(ours[key], control[key]), key
    assert torch.equal(adapter.network.zero_blocks["12"].weight, control["zero_blocks.12.weight"])  # the middle's
    dropped = {k for k in control if k.startswith(UNUSED_ZERO_BLOCKS + ("res_weights.",))}
    assert set(report.dropped) == dropped and len(dropped) == 8 + 14
    assert set(kept) | dropped == set(control)
    assert report.ignored == 4  # the SD model's keys in the Lightning state_dict
    assert report.kept_numbers == sum(v.numel() for v in ours.values())

    assert adapter.omega == DISTINCT_OMEGA and adapter.hint_meaning == "sketch"
    prov = adapter.metadata["provenance"]
    assert prov["converted_from"] == "official.ckpt" and prov["epoch"] == 15 and prov["global_step"] == 40
    assert adapter.metadata["config"] == TINY.to_dict() and adapter.metadata["format_version"] == 2


def test_omega_is_taken_from_res_weights_and_the_rest_is_reported():
    res = [float(v) for v in torch.linspace(3.0, 0.25, 14)]
    state, omega, config, dropped = convert_official_state_dict(sketch_state_dict(res=res))
    assert config == TINY
    for port, block in enumerate(ENCODER_BLOCKS):
        assert omega[port] == res[block]
        assert f"omega of port input_{block}" in dropped[f"res_weights.{block}"]
    assert omega[8] == res[13] and "omega of port middle" in dropped["res_weights.13"]
    assert omega[9:] == [1.0] * 12
    for unused in (0, 3, 6, 9, 12):
        assert "never uses" in dropped[f"res_weights.{unused}"]
    for key in (k for k in dropped if k.startswith("zero_blocks.")):
        assert key.startswith(UNUSED_ZERO_BLOCKS) and "never uses" in dropped[key]


def test_kept_tensors_are_not_copied_by_the_mapping():
    control = sketch_state_dict()
    state, *_ = convert_official_state_dict({"state_dict": {PREFIX + k: v for k, v in control.items()}})
    assert all(state[k] is control[k] for k in state)


@pytest.mark.parametrize("name", ["sketch", "layout"])
def test_without_res_weights_the_official_yaml_weights_are_used(tmp_path, name):
    """A control_model dict stripped of res_weights gets the weights its official yaml starts with:
    top-heavy for the sketch, 1 everywhere for the layout."""
    control = {k: v for k, v in official_state_dict(name).items() if not k.startswith("res_weights.")}
    torch.save({**control, "epoch": 3}, tmp_path / "bare.pth")  # bare control_model state dict, keys without prefix
    report = convert_official(tmp_path / "bare.pth", tmp_path / "o.safetensors")
    assert report.omega == official_omega(name) and f"{CONFIGS[name]}'s res_weights" in str(report)
    assert report.ignored == 1 and report.dropped == {k: v for k, v in report.dropped.items()
                                                      if k.startswith(UNUSED_ZERO_BLOCKS)}
    assert load_adapter(tmp_path / "o.safetensors").omega == official_omega(name)


def test_other_level_layouts_are_inferred():
    """A layout no official configuration has (2 levels, 1 ResBlock each): the middle zero conv is still
    the last zero_blocks entry, after one per input block."""
    cfg = BPSConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, time_embed_dim=64)
    with torch.device("meta"):
        ours = BPSNetwork(cfg).state_dict()
    assert "zero_blocks.4.weight" in ours and cfg.num_input_blocks == 4
    g = torch.Generator().manual_seed(0)
    control = {k: torch.randn(v.shape, generator=g) for k, v in ours.items()}
    control.update({"zero_blocks.0.weight": torch.zeros(32, 32, 3, 3), "zero_blocks.0.bias": torch.zeros(32),
                    "zero_blocks.2.weight": torch.zeros(32, 32, 3, 3), "zero_blocks.2.bias": torch.zeros(32)})
    control.update({f"res_weights.{i}": torch.tensor(float(i + 1)) for i in range(6)})
    state, omega, config, dropped = convert_official_state_dict(control)
    assert config == cfg and config.num_ports == 7
    assert omega == [2.0, 4.0, 6.0, 1.0, 1.0, 1.0, 1.0]  # blocks 1 and 3, middle = last res_weights
    assert set(dropped) == {k for k in control if k not in ours}


def test_bf16_output_and_the_report(tmp_path, official_ckpt):
    report = convert_official(official_ckpt, tmp_path / "o.safetensors", dtype=torch.bfloat16, hint_meaning="edges")
    a = load_adapter(tmp_path / "o.safetensors")
    assert a.network.dtype == torch.bfloat16 and a.hint_meaning == "edges"
    text = str(report)
    for part in ("inferred config", "'model_channels': 32", "bfloat16", "kept 232 tensors", "dropped 22 tensors",
                 "zero_blocks.0.weight: zero conv", "res_weights.1: port weight", "input_1=1.5", "middle=13.5",
                 "output_11=1", "ignored 4 other state-dict entries", "bps_sd15_pidinet.yaml"):
        assert part in text, (part, text)
    assert "Apply BPS" not in text  # a sketch adapter needs no note


def test_a_damaged_converted_adapter_is_refused_naming_the_file(tmp_path, official_ckpt):
    out = tmp_path / "a.safetensors"
    convert_official(official_ckpt, out, dtype=torch.float32)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(out.read_bytes()[:-4096])
    with pytest.raises(AdapterError, match="truncated") as err:
        load_adapter(cut)
    assert repr(str(cut)) in str(err.value)
    flipped = bytearray(out.read_bytes())
    flipped[20:30] = b"\xff" * 10  # inside the JSON header
    (tmp_path / "bad.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(AdapterError, match="header is corrupt") as err:
        load_adapter(tmp_path / "bad.safetensors")
    assert repr(str(tmp_path / "bad.safetensors")) in str(err.value)


# ---- reading checkpoints safely, and refusals --------------------------------------------------

class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_pickles_are_refused_never_executed(tmp_path, capsys):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {PREFIX + "input_blocks.0.weight": torch.zeros(1)}, "callback": _Evil()}, evil)
    with pytest.raises(AdapterError) as err:
        read_checkpoint(str(evil))
    message = str(err.value)
    assert "cannot be read safely" in message and "weights_only=True" in message and "GLOBAL print" in message
    assert "never does" in message and str(evil) in message
    assert "pwned" not in capsys.readouterr().out


def test_legacy_format_and_bare_state_dicts_are_read(tmp_path):
    control = sketch_state_dict(res=RES)
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {PREFIX + k: v for k, v in control.items()}}, path,
               _use_new_zipfile_serialization=False)
    report = convert_official(path, tmp_path / "o.safetensors", dtype=torch.float32)
    assert report.omega == DISTINCT_OMEGA
    assert torch.equal(load_adapter(tmp_path / "o.safetensors").network.input_blocks[0].weight,
                       control["input_blocks.0.weight"])


def _truncated(tmp_path, path):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[:100_000])
    return cut


def _without(key):
    return lambda: {k: v for k, v in sketch_state_dict(res=RES).items() if k != key}


def _with(key, value):
    return lambda: {**sketch_state_dict(res=RES), key: value}


def _nan():
    sd = sketch_state_dict(res=RES)
    key = "middle_block.1.in_layers.2.weight"
    sd[key] = sd[key].clone()
    sd[key][0, 0, 0, 0] = float("nan")
    return sd


STATE_DICT_REFUSALS = {
    "not bps": (lambda: {"state_dict": {"model.diffusion_model.out.0.weight": torch.zeros(1)}},
                "holds no BPS control model"),
    "unknown hint layout": (_with("input_blocks.0.weight", torch.zeros(32, 100, 3, 3)), "takes 100 channels"),
    "missing tensor": (_without("output_blocks.7.1.bias"), "lacks 1 BPS tensor(s) (e.g. output_blocks.7.1.bias)"),
    "unknown tensor": (_with("input_hint_block.0.weight", torch.zeros(3)), "does not know (e.g. input_hint_block"),
    "wrong shape": (_with("zero_blocks.12.bias", torch.zeros(7)), "zero_blocks.12.bias has shape (7,)"),
    "middle zero conv under our old name": (_with("middle_block.2.bias", torch.zeros(128)),
                                            "does not know (e.g. middle_block.2.bias)"),
    "nan": (_nan, "middle_block.1.in_layers.2.weight contains NaN"),
    "missing res_weight": (_without("res_weights.12"), "found res_weights"),
    "non-finite res_weight": (_with("res_weights.13", torch.tensor(float("inf"))), "non-finite port weights"),
}


@pytest.mark.parametrize("case", list(STATE_DICT_REFUSALS))
def test_state_dict_refusals(case):
    make, problem = STATE_DICT_REFUSALS[case]
    with pytest.raises(AdapterError, match="'ckpt.pth'") as err:
        convert_official_state_dict(make(), "ckpt.pth")
    assert problem in str(err.value)


@pytest.mark.parametrize("case", ["missing input", "truncated", "text", "exists", "not safetensors", "same file",
                                  "corrupt safetensors"])
def test_file_refusals(tmp_path, official_ckpt, case):
    good = official_ckpt
    out = tmp_path / "out.safetensors"
    args, problem = {
        "missing input": ((tmp_path / "nope.ckpt", out), "does not exist"),
        "truncated": ((_truncated(tmp_path, good), out), "corrupt or truncated"),
        "text": ((tmp_path / "notes.txt", out), "not a checkpoint"),
        "exists": ((good, tmp_path / "official.ckpt.safetensors"), "already exists. Pass --overwrite"),
        "not safetensors": ((good, tmp_path / "out.ckpt"), "must be a .safetensors file"),
        "same file": ((tmp_path / "x.safetensors", tmp_path / "x.safetensors"), "is the input file"),
        "corrupt safetensors": ((tmp_path / "bad.safetensors", out), "corrupt or truncated"),
    }[case]
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "official.ckpt.safetensors").write_bytes(b"keep me")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(AdapterError) as err:
        convert_official(*args)
    assert problem in str(err.value) and any(repr(str(a)) in str(err.value) for a in args), str(err.value)
    assert not out.exists() and (tmp_path / "official.ckpt.safetensors").read_bytes() == b"keep me"
    if case == "exists":
        convert_official(*args, overwrite=True)
        assert load_adapter(args[1]).omega == DISTINCT_OMEGA


def test_cli_converts_and_refuses_unsafe_pickles(tmp_path, official_ckpt):
    ckpt = official_ckpt
    out = tmp_path / "cli.safetensors"
    ok = subprocess.run([sys.executable, "-m", "bps.convert_official", str(ckpt), str(out), "--dtype", "fp32",
                         "--hint-meaning", "sketch"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert f"wrote {out} (float32)" in ok.stdout and "dropped 22 tensors" in ok.stdout
    assert "zero_blocks.3.weight" in ok.stdout and "res_weights.13: port weight -> omega of port middle" in ok.stdout
    assert "inferred config" in ok.stdout and "input_1=1.5" in ok.stdout
    assert load_adapter(out).omega == DISTINCT_OMEGA

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": _Evil()}, evil)
    bad = subprocess.run([sys.executable, "-m", "bps.convert_official", str(evil), str(tmp_path / "x.safetensors")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ") and "cannot be read safely" in bad.stderr
    assert "Traceback" not in bad.stderr and "pwned" not in bad.stdout + bad.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_converts_style2_and_says_apply_bps_cannot_feed_it(tmp_path):
    """The 24-channel style2 configuration converts; the report says what it expects and that Apply BPS
    cannot feed it (no IMAGE carries a 24-channel map at latent resolution)."""
    ckpt = lightning_ckpt(tmp_path / "style2.ckpt", official_state_dict("style2"))
    out = tmp_path / "style2.safetensors"
    run = subprocess.run([sys.executable, "-m", "bps.convert_official", str(ckpt), str(out), "--dtype", "fp32"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "bps_sd15_style2.yaml" in run.stdout and "hint: a 24-channel map at latent resolution" in run.stdout
    assert "note: this adapter expects a 24-channel map at latent resolution" in run.stdout
    assert "cannot carry" in run.stdout and "meaning 'style2'" in run.stdout
    adapter = load_adapter(out)
    assert (adapter.config.hint_channels, adapter.config.downscale) == (24, 1)
    assert not adapter.config.takes_image_hint and adapter.omega == official_omega("style2")
