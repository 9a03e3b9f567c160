"""Official BPS-v1-1 checkpoints: key mapping, omega, parameter accounting, parity with an independent
reference forward, input formats, and refusals (in-process and through the CLI)."""

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bps import AdapterError, BPSConfig, BPSNetwork, load_adapter, read_adapter_metadata
from bps.convert_official import (PREFIX, convert_official, convert_official_state_dict, infer_config,
                                  read_checkpoint)
from bps.ports import PAPER_OMEGA

ROOT = Path(__file__).resolve().parents[1]
TINY = BPSConfig(model_channels=32, time_embed_dim=64)
RES = [0.5 + i for i in range(14)]  # distinct values: res_weights[i] -> encoder block i, [13] -> middle
ENCODER_BLOCKS = (1, 2, 4, 5, 7, 8, 10, 11)
OFFICIAL_OMEGA = [RES[b] for b in ENCODER_BLOCKS] + [RES[13]] + [1.0] * 12
UNUSED_ZERO_BLOCKS = ("zero_blocks.0.", "zero_blocks.3.", "zero_blocks.6.", "zero_blocks.9.")


# Tiny tensors: one thread (conftest.py's one_thread) runs them faster than a thread pool.
pytestmark = pytest.mark.usefixtures("one_thread")


def official_shapes(config):
    """Official control_model key -> shape: ours plus zero_blocks 0,3,6,9 and the 14 res_weights."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in BPSNetwork(config).state_dict().items()}
    mc, mult = config.model_channels, config.channel_mult
    widths = {0: mc * mult[0], 3: mc * mult[0], 6: mc * mult[1], 9: mc * mult[2]}
    for block, ch in widths.items():
        shapes[f"zero_blocks.{block}.weight"] = (ch, ch, 3, 3)
        shapes[f"zero_blocks.{block}.bias"] = (ch,)
    for i in range(14):
        shapes[f"res_weights.{i}"] = ()
    return shapes


def official_state_dict(config=TINY, seed=0, res=RES):
    """A random (non-zero) official-format control_model state dict, unused parts included.

    Weights are scaled like a default init so activations stay O(1) through the whole network.
    Returns a new dict each call; its tensors are shared between calls, so never modify them in place.
    """
    return dict(_official_state_dict(config, seed, tuple(res)))


@functools.lru_cache(maxsize=8)
def _official_state_dict(config, seed, res):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in official_shapes(config).items():
        if key.startswith("res_weights."):
            sd[key] = torch.tensor(float(res[int(key.split(".")[1])]))
        elif len(shape) > 1:
            sd[key] = torch.randn(shape, generator=g) / (torch.tensor(shape[1:]).prod().float().sqrt())
        elif "norm" in key or ".in_layers.0." in key or ".out_layers.0." in key:
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g) if key.endswith("weight") \
                else 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.1 * torch.randn(shape, generator=g)
    return sd


def lightning_ckpt(path, control):
    """Save ``control`` as the official training code would: inside a Lightning checkpoint with the whole SD."""
    ckpt = {"epoch": 15, "global_step": 40, "pytorch-lightning_version": "1.5.0",
            "state_dict": {**{PREFIX + k: v for k, v in control.items()},
                           "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                           "model.diffusion_model.out.2.bias": torch.zeros(4),
                           "first_stage_model.decoder.conv_in.weight": torch.zeros(2),
                           "cond_stage_model.transformer.text_model.final_layer_norm.bias": torch.zeros(3)},
            "optimizer_states": [{"state": {0: {"step": torch.tensor(40.0)}}, "param_groups": [{"lr": 1e-5}]}]}
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    """A tiny official Lightning checkpoint shared by tests that only read it."""
    return lightning_ckpt(tmp_path_factory.mktemp("official") / "official.ckpt", official_state_dict())


# ---- the reference: the official forward written from the spec, straight from the official state dict

def reference_ports(sd, hint, emb, extra=None):
    """Official port outputs (res_weights applied), computed functionally from the official state dict."""
    res = [float(sd[f"res_weights.{i}"]) for i in range(14)]

    def conv(x, name, stride=1):
        return F.conv2d(x, sd[name + ".weight"], sd[name + ".bias"], stride=stride, padding=1)

    def norm(x, name):
        return F.group_norm(x.float(), 32, sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    def skip(x, name):
        key = name + ".skip_connection.weight"
        return F.conv2d(x, sd[key], sd[name + ".skip_connection.bias"]) if key in sd else x

    def resblock(x, name):
        h = conv(F.silu(norm(x, name + ".in_layers.0")), name + ".in_layers.2")
        e = F.linear(F.silu(emb), sd[name + ".emb_layers.1.weight"], sd[name + ".emb_layers.1.bias"])
        scale, shift = e[:, :, None, None].chunk(2, dim=1)
        h = norm(h, name + ".out_layers.0") * (1 + scale) + shift
        return skip(x, name) + conv(F.silu(h), name + ".out_layers.3")

    x = F.pixel_unshuffle(hint, 8)
    if extra is not None:
        x = torch.cat([x, F.pixel_unshuffle(extra, 8)], dim=1)
    h = conv(x, "input_blocks.0")
    skips, outs = [h], []
    for i in range(1, 12):
        if i in (3, 6, 9):
            h = conv(h, f"input_blocks.{i}.op", stride=2)
        else:
            h = resblock(h, f"input_blocks.{i}")
            outs.append(res[i] * conv(h, f"zero_blocks.{i}"))
        skips.append(h)
    h = resblock(resblock(h, "middle_block.0"), "middle_block.1")
    outs.append(res[13] * conv(h, "middle_block.2"))
    for k in range(12):
        x = torch.cat([h, skips.pop()], dim=1)
        name = f"output_blocks.{k}.0"
        h = skip(x, name) + conv(F.silu(norm(x, name + ".out_layers.0")), name + ".out_layers.3")
        outs.append(1.0 * conv(h, f"output_blocks.{k}.1"))
        if k in (2, 5, 8):
            h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"output_blocks.{k}.2.conv")
    return outs


# ---- conversion ---------------------------------------------------------------------------------

def test_every_official_key_lands_where_it_should(tmp_path, official_ckpt):
    control = official_state_dict()
    out = tmp_path / "a.safetensors"
    report = convert_official(official_ckpt, out, dtype=torch.float32)
    adapter = load_adapter(out)
    ours = adapter.network.state_dict()
    kept = [k for k in control if k in ours]
    assert len(kept) == len(ours) == report.kept  # every tensor of the network comes from the checkpoint
    for key in kept:
        assert ours[key].dtype == torch.float32 and torch.equal(ours[key], control[key]), key
    dropped = {k for k in control if k.startswith(UNUSED_ZERO_BLOCKS + ("res_weights.",))}
    assert set(report.dropped) == dropped and len(dropped) == 8 + 14
    assert set(kept) | dropped == set(control)
    assert report.ignored == 4  # the SD model's keys in the Lightning state_dict
    assert report.kept_numbers == sum(v.numel() for v in ours.values())

    assert adapter.omega == OFFICIAL_OMEGA and adapter.hint_meaning == "sketch"
    prov = adapter.metadata["provenance"]
    assert prov["converted_from"] == "official.ckpt" and prov["epoch"] == 15 and prov["global_step"] == 40
    assert adapter.metadata["config"] == TINY.to_dict()


def test_omega_is_taken_from_res_weights_and_the_rest_is_reported():
    res = [float(v) for v in torch.linspace(3.0, 0.25, 14)]
    state, omega, config, dropped = convert_official_state_dict(official_state_dict(res=res))
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
    control = official_state_dict()
    state, *_ = convert_official_state_dict({"state_dict": {PREFIX + k: v for k, v in control.items()}})
    assert all(state[k] is control[k] for k in state)


def test_without_res_weights_the_paper_defaults_are_used(tmp_path):
    control = {k: v for k, v in official_state_dict().items() if not k.startswith("res_weights.")}
    torch.save({**control, "epoch": 3}, tmp_path / "bare.pth")  # bare control_model state dict, keys without prefix
    report = convert_official(tmp_path / "bare.pth", tmp_path / "o.safetensors")
    assert report.omega == list(PAPER_OMEGA) and "paper defaults" in str(report)
    assert report.ignored == 1 and report.dropped == {k: v for k, v in report.dropped.items()
                                                      if k.startswith(UNUSED_ZERO_BLOCKS)}
    assert load_adapter(tmp_path / "o.safetensors").omega == list(PAPER_OMEGA)


def test_official_parameter_count_is_fully_accounted_for():
    """The official SD1.5 sketch network holds 692,370,894 numbers: ours plus what is dropped on purpose."""
    with torch.device("meta"):
        net = BPSNetwork(BPSConfig())
    ours = sum(p.numel() for p in net.parameters())
    zero_blocks = sum(w * w * 9 + w for w in (320, 320, 640, 1280))  # zero_blocks 0, 3, 6, 9: 3x3 conv + bias
    assert ours + zero_blocks + 14 == 692_370_894
    assert (ours, zero_blocks) == (672_093_120, 20_277_760)
    shapes = official_shapes(BPSConfig())  # the same count from the official key list
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 692_370_894


@pytest.mark.parametrize("variant", ["sketch", "style"])
def test_converted_network_returns_official_outputs_divided_by_weights(tmp_path, variant):
    cfg = TINY if variant == "sketch" else BPSConfig(hint_channels=3, extra_channels=1, model_channels=32,
                                                     time_embed_dim=64)
    control = official_state_dict(cfg, seed=1)
    out = tmp_path / "p.safetensors"
    convert_official(lightning_ckpt(tmp_path / "official.ckpt", control), out, dtype=torch.float32)
    adapter = load_adapter(out)
    g = torch.Generator().manual_seed(2)
    hint, emb = torch.rand(2, cfg.hint_channels, 64, 64, generator=g), torch.randn(2, 64, generator=g)
    extra = torch.rand(2, 1, 64, 64, generator=g) if cfg.extra_channels else None
    official = reference_ports(control, hint, emb, extra)
    with torch.no_grad():
        ours = adapter.network(hint if extra is None else torch.cat([hint, extra], dim=1), emb)
    assert len(ours) == len(official) == 21
    for i, (a, b) in enumerate(zip(ours, official)):
        expected = b / adapter.omega[i]
        assert a.shape == expected.shape and expected.abs().max() > 0.01, i
        rel = float((a - expected).abs().max() / expected.abs().max())
        assert rel < 1e-5, (i, rel)


@pytest.mark.parametrize("hint_channels, extra_channels, in_channels, meaning",
                         [(1, 0, 64, "sketch"), (3, 0, 192, "layout"), (3, 1, 256, "style")])
def test_hint_layout_and_widths_are_inferred(hint_channels, extra_channels, in_channels, meaning, tmp_path):
    cfg = BPSConfig(hint_channels=hint_channels, extra_channels=extra_channels, model_channels=32,
                    time_embed_dim=96)
    control = official_state_dict(cfg)
    assert control["input_blocks.0.weight"].shape[1] == in_channels
    assert infer_config(control) == cfg
    path = tmp_path / "in.safetensors"
    from safetensors.torch import save_file
    save_file({PREFIX + k: v for k, v in control.items()}, str(path))  # a .safetensors of the full-model keys
    report = convert_official(path, tmp_path / "o.safetensors")
    meta = read_adapter_metadata(tmp_path / "o.safetensors")
    assert report.config == cfg and meta["hint_meaning"] == meaning and meta["hint_channels"] == hint_channels
    assert load_adapter(tmp_path / "o.safetensors").network.dtype == torch.float16  # the default dtype


def test_other_level_layouts_are_inferred():
    cfg = BPSConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, time_embed_dim=64)
    with torch.device("meta"):
        ours = BPSNetwork(cfg).state_dict()
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
                 "output_11=1", "ignored 4 other state-dict entries"):
        assert part in text, (part, text)


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
    control = official_state_dict()
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {PREFIX + k: v for k, v in control.items()}}, path,
               _use_new_zipfile_serialization=False)
    report = convert_official(path, tmp_path / "o.safetensors", dtype=torch.float32)
    assert report.omega == OFFICIAL_OMEGA
    assert torch.equal(load_adapter(tmp_path / "o.safetensors").network.input_blocks[0].weight,
                       control["input_blocks.0.weight"])


def _truncated(tmp_path, path):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[:100_000])
    return cut


def _without(key):
    return lambda: {k: v for k, v in official_state_dict().items() if k != key}


def _with(key, value):
    return lambda: {**official_state_dict(), key: value}


def _nan():
    sd = official_state_dict()
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
    "wrong shape": (_with("middle_block.2.bias", torch.zeros(7)), "middle_block.2.bias has shape (7,)"),
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
        assert load_adapter(args[1]).omega == OFFICIAL_OMEGA


def test_cli_converts_and_refuses_unsafe_pickles(tmp_path, official_ckpt):
    ckpt = official_ckpt
    out = tmp_path / "cli.safetensors"
    ok = subprocess.run([sys.executable, "-m", "bps.convert_official", str(ckpt), str(out), "--dtype", "fp32",
                         "--hint-meaning", "sketch"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert f"wrote {out} (float32)" in ok.stdout and "dropped 22 tensors" in ok.stdout
    assert "zero_blocks.3.weight" in ok.stdout and "res_weights.13: port weight -> omega of port middle" in ok.stdout
    assert "inferred config" in ok.stdout and "input_1=1.5" in ok.stdout
    assert load_adapter(out).omega == OFFICIAL_OMEGA

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": _Evil()}, evil)
    bad = subprocess.run([sys.executable, "-m", "bps.convert_official", str(evil), str(tmp_path / "x.safetensors")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ") and "cannot be read safely" in bad.stderr
    assert "Traceback" not in bad.stderr and "pwned" not in bad.stdout + bad.stderr
    assert not (tmp_path / "x.safetensors").exists()
