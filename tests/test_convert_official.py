"""Official BPS-v1-1 checkpoints: key mapping, omega, parameter accounting, parity and refusals."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bps import AdapterError, BPSConfig, BPSNetwork, load_adapter
from bps.convert_official import PREFIX, convert_official, convert_official_state_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = BPSConfig(model_channels=32, time_embed_dim=64)
RES = [0.5 + i for i in range(14)]  # distinct values: res_weights[i] -> encoder block i, [13] -> middle


def official_state_dict(config=TINY, seed=0):
    """An official-format control_model state dict, including what the official network never uses."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in BPSNetwork(config).state_dict().items()}
    widths = {0: config.model_channels, 3: config.model_channels, 6: 2 * config.model_channels,
              9: 4 * config.model_channels}
    for block, ch in widths.items():
        sd[f"zero_blocks.{block}.weight"] = torch.randn(ch, ch, 3, 3, generator=g)
        sd[f"zero_blocks.{block}.bias"] = torch.randn(ch, generator=g)
    for i, w in enumerate(RES):
        sd[f"res_weights.{i}"] = torch.tensor(w)
    return sd


def lightning_ckpt(tmp_path, control):
    ckpt = {"epoch": 15, "global_step": 40,
            "state_dict": {**{PREFIX + k: v for k, v in control.items()},
                           "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2),
                           "first_stage_model.decoder.conv_in.weight": torch.zeros(2)}}
    path = tmp_path / "official.ckpt"
    torch.save(ckpt, path)
    return path


def reference_ports(sd, hint, emb, res_weights):
    """Official port outputs (times the official weights) from the state dict alone, functionally."""
    def conv(x, name, stride=1):
        return F.conv2d(x, sd[name + ".weight"], sd[name + ".bias"], stride=stride, padding=1)

    def norm(x, name):
        return F.group_norm(x, 32, sd[name + ".weight"], sd[name + ".bias"], 1e-5)

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
    h, skips, outs = conv(x, "input_blocks.0"), [], []
    skips.append(h)
    for i in range(1, 12):
        if i in (3, 6, 9):
            h = conv(h, f"input_blocks.{i}.op", stride=2)
        else:
            h = resblock(h, f"input_blocks.{i}")
            outs.append(res_weights[i] * conv(h, f"zero_blocks.{i}"))
        skips.append(h)
    h = resblock(resblock(h, "middle_block.0"), "middle_block.1")
    outs.append(res_weights[-1] * conv(h, "middle_block.2"))
    for k in range(12):
        x = torch.cat([h, skips.pop()], dim=1)
        name = f"output_blocks.{k}.0"
        h = skip(x, name) + conv(F.silu(norm(x, name + ".out_layers.0")), name + ".out_layers.3")
        outs.append(conv(h, f"output_blocks.{k}.1"))
        if k in (2, 5, 8):
            h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"output_blocks.{k}.2.conv")
    return outs


def test_every_official_key_lands_where_it_should(tmp_path):
    control = official_state_dict()
    out = tmp_path / "a.safetensors"
    report = convert_official(str(lightning_ckpt(tmp_path, control)), str(out), dtype=torch.float32)
    adapter = load_adapter(out)
    ours = adapter.network.state_dict()
    for key, value in control.items():
        if key in ours:
            assert torch.equal(ours[key], value), key
        else:
            assert key in report.dropped, key
    assert set(report.dropped) == {k for k in control if k.startswith(("zero_blocks.0.", "zero_blocks.3.",
                                                                        "zero_blocks.6.", "zero_blocks.9.",
                                                                        "res_weights."))}
    assert report.kept == len(ours)
    assert "never uses" in report.dropped["res_weights.12"] and "omega" in report.dropped["res_weights.13"]
    assert adapter.omega[:8] == [RES[b] for b in (1, 2, 4, 5, 7, 8, 10, 11)]
    assert adapter.omega[8] == RES[13] and adapter.omega[9:] == [1.0] * 12
    assert adapter.metadata["provenance"]["converted_from"] == "official.ckpt"


def test_official_parameter_count_is_fully_accounted_for():
    with torch.device("meta"):
        net = BPSNetwork(BPSConfig())
        control = {k: torch.empty(v.shape) for k, v in net.state_dict().items()}
        for block, ch in {0: 320, 3: 320, 6: 640, 9: 1280}.items():
            control[f"zero_blocks.{block}.weight"] = torch.empty(ch, ch, 3, 3)
            control[f"zero_blocks.{block}.bias"] = torch.empty(ch)
        for i in range(14):
            control[f"res_weights.{i}"] = torch.empty(())
    assert sum(v.numel() for v in control.values()) == 692_370_894
    loaded = sum(p.numel() for p in net.parameters())
    dropped = sum(v.numel() for k, v in control.items() if k not in net.state_dict())
    assert loaded == 672_093_120 and dropped == 20_277_774 and loaded + dropped == 692_370_894


def test_converted_network_returns_official_outputs_divided_by_weights(tmp_path):
    control = official_state_dict(seed=1)
    out = tmp_path / "p.safetensors"
    convert_official(str(lightning_ckpt(tmp_path, control)), str(out), dtype=torch.float32)
    net = load_adapter(out).network
    g = torch.Generator().manual_seed(2)
    hint, emb = torch.rand(2, 1, 64, 64, generator=g), torch.randn(2, 64, generator=g)
    weights = [RES[b] for b in (1, 2, 4, 5, 7, 8, 10, 11)] + [RES[13]] + [1.0] * 12
    official = reference_ports(control, hint, emb, RES)
    with torch.no_grad():
        ours = net(hint, emb)
    for i, (a, b) in enumerate(zip(ours, official)):
        rel = float((a - b / weights[i]).abs().max() / (b / weights[i]).abs().max())
        assert rel < 1e-5, (i, rel)


@pytest.mark.parametrize("channels, layout", [(3, (3, 0)), (4, (3, 1))])
def test_hint_channels_are_inferred(channels, layout):
    cfg = BPSConfig(hint_channels=layout[0], extra_channels=layout[1], model_channels=32, time_embed_dim=64)
    state, omega, config, _ = convert_official_state_dict(official_state_dict(cfg))
    assert (config.hint_channels, config.extra_channels) == layout and config.in_channels in (192, 256)


def test_bare_state_dict_and_safetensors_input(tmp_path):
    from safetensors.torch import save_file
    control = official_state_dict()
    path = tmp_path / "bare.safetensors"
    save_file(control, str(path))
    convert_official(str(path), str(tmp_path / "o.safetensors"))
    assert load_adapter(tmp_path / "o.safetensors").network.dtype == torch.float16


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cli_converts_and_refuses_unsafe_pickles(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "bps.convert_official", str(lightning_ckpt(tmp_path, official_state_dict())),
                         str(tmp_path / "cli.safetensors")], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "dropped 22 tensors" in ok.stdout and "zero_blocks.3.weight" in ok.stdout
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": _Evil()}, evil)
    bad = subprocess.run([sys.executable, "-m", "bps.convert_official", str(evil), str(tmp_path / "x.safetensors")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "cannot be read safely" in bad.stderr
    assert "Traceback" not in bad.stderr and "pwned" not in bad.stdout
    again = subprocess.run([sys.executable, "-m", "bps.convert_official", str(evil), str(tmp_path / "cli.safetensors")],
                           cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_not_a_bps_checkpoint():
    with pytest.raises(AdapterError, match="holds no BPS control model"):
        convert_official_state_dict({"state_dict": {"model.diffusion_model.out.0.weight": torch.zeros(1)}})
