"""Optimizers and weight dtypes of the trainer on tiny networks (no ComfyUI, no full-size model):
bit-exact resume through a real checkpoint with every optimizer, refusal to resume with another
one, stochastic rounding vs plain bf16 at lr 1e-5, memory accounting, the --low-vram preset."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bps.network import BPSConfig, BPSNetwork  # noqa: E402
from train import checkpointing as ckpt  # noqa: E402
from train import cli  # noqa: E402
from train.cli import build_parser, parse_args  # noqa: E402
from train.optimizers import (OPTIMIZERS, OptimizerChoice, OptimizerError, bitsandbytes_available,  # noqa: E402
                              check_resume_choice, make_optimizer, optimizer_state_bytes, parameter_bytes)
from train.stochastic_rounding import stochastic_round_to_bf16  # noqa: E402

# Two levels of 32/64 channels: every kind of B_phi layer, a 32x32 px hint.
TINY = BPSConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, time_embed_dim=64)
# CI fails on any skip, and bitsandbytes is optional: without it the adamw8bit cases check the
# install hint instead (_needs_missing_bitsandbytes); with it they run in full.
CHOICES = [pytest.param(OptimizerChoice(k, d), id=f"{k}-{d}") for k in OPTIMIZERS for d in ("fp32", "bf16")]


def _needs_missing_bitsandbytes(choice: OptimizerChoice) -> bool:
    if choice.kind != "adamw8bit" or bitsandbytes_available():
        return False
    with pytest.raises(OptimizerError, match="pip install bitsandbytes"):
        make_optimizer(_network(choice).parameters(), choice, lr=1e-3, weight_decay=0.0)
    return True


def _network(choice: OptimizerChoice) -> BPSNetwork:
    torch.manual_seed(0)
    return BPSNetwork(TINY).to(choice.dtype).train()


def _train(network: BPSNetwork, optimizer, steps: range) -> list[float]:
    """Fit random port targets; the batch of step i depends only on i (like the trainer's data order)."""
    losses = []
    for i in steps:
        g = torch.Generator().manual_seed(100 + i)
        hint = torch.rand(1, 1, 32, 32, generator=g)
        emb = torch.randn(1, TINY.time_embed_dim, generator=g)
        outs = network(hint, emb)
        loss = sum(torch.nn.functional.mse_loss(o.float(), torch.randn(o.shape, generator=g) * 0.1)
                   for o in outs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _same(a, b, where="") -> None:
    """Recursive exact equality of (optimizer) state: tensors bit for bit, the rest by value."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("choice", CHOICES)
def test_every_optimizer_resumes_bit_exact_through_a_checkpoint(choice, tmp_path):
    """4 straight steps == 2 steps + checkpoint on disk + fresh network and optimizer + 2 steps."""
    if _needs_missing_bitsandbytes(choice):
        return
    lr = 1e-3
    net = _network(choice)
    opt = make_optimizer(net.parameters(), choice, lr=lr, weight_decay=1e-2, seed=3)
    straight = _train(net, opt, range(4))

    net_a = _network(choice)
    opt_a = make_optimizer(net_a.parameters(), choice, lr=lr, weight_decay=1e-2, seed=3)
    first = _train(net_a, opt_a, range(2))
    tensors, rest = ckpt.flatten_state(net_a.state_dict(), opt_a.state_dict())
    ckpt.save_checkpoint(tmp_path, 2, tensors, {"step": 2, "optimizer": rest,
                                                "optimizer_choice": choice.to_dict()})
    _, _, tensors, state = ckpt.load_latest_checkpoint(tmp_path)
    net_sd, opt_sd = ckpt.unflatten_state(tensors, state["optimizer"])
    _same(opt_a.state_dict(), opt_sd, "optimizer")  # the flattening is lossless

    check_resume_choice(state["optimizer_choice"], choice, "ckpt")
    with torch.device("meta"):
        net_b = BPSNetwork(TINY)
    net_b = net_b.to_empty(device="cpu").to(choice.dtype).train()
    net_b.load_state_dict(net_sd)
    opt_b = make_optimizer(net_b.parameters(), choice, lr=lr, weight_decay=1e-2, seed=999)  # seed restored
    opt_b.load_state_dict(opt_sd)
    resumed = first + _train(net_b, opt_b, range(2, 4))

    assert resumed == straight
    fresh = _network(choice).state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in net.state_dict().items())  # it trains at all
    for (k, v), w in zip(net.state_dict().items(), net_b.state_dict().values()):
        assert v.dtype == choice.dtype and torch.equal(v, w), k


def test_resume_with_another_optimizer_or_dtype_is_refused_naming_both():
    saved = OptimizerChoice("adamw", "fp32").to_dict()
    with pytest.raises(OptimizerError, match=r"trained with --optimizer adamw --weights-dtype fp32, this run asks "
                                             r"for --optimizer adafactor --weights-dtype fp32.*--overwrite"):
        check_resume_choice(saved, OptimizerChoice("adafactor", "fp32"), "run/step_00000002")
    with pytest.raises(OptimizerError, match="--weights-dtype bf16"):
        check_resume_choice(saved, OptimizerChoice("adamw", "bf16"), "x")
    check_resume_choice(None, OptimizerChoice(), "a checkpoint from before --optimizer existed")  # AdamW fp32
    with pytest.raises(OptimizerError, match="adamw8bit"):
        check_resume_choice(None, OptimizerChoice("adamw8bit"), "old")
    with pytest.raises(OptimizerError, match="unknown optimizer 'sgd'"):
        OptimizerChoice("sgd")


def test_adamw8bit_without_bitsandbytes_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    assert not bitsandbytes_available()
    with pytest.raises(OptimizerError, match="optional package bitsandbytes.*pip install bitsandbytes.*adafactor"):
        make_optimizer([torch.nn.Parameter(torch.zeros(3))], OptimizerChoice("adamw8bit"), lr=1e-5,
                       weight_decay=0.0)


def test_weights_in_another_dtype_than_chosen_are_refused():
    with pytest.raises(OptimizerError, match="--weights-dtype bf16 but the trainable weights are torch.float32"):
        make_optimizer([torch.nn.Parameter(torch.zeros(3))], OptimizerChoice("adamw", "bf16"), lr=1e-5,
                       weight_decay=0.0)


def test_plain_bf16_updates_stall_at_lr_1e5_and_stochastic_rounding_follows_fp32():
    """Weights of ~1e-2 and AdamW steps of ~1e-5: below half a bf16 step, so plain bf16 AdamW never
    changes a weight; the fp32-update + stochastic-rounding optimizer lowers the loss as fp32 does."""
    g = torch.Generator().manual_seed(0)
    # |w| in [0.01, 0.03): a bf16 step there is 6e-5 or 1.2e-4, more than twice an update of 1e-5
    w0 = (1 + 2 * torch.rand(64, 64, generator=g)) * 1e-2 * torch.randn(64, 64, generator=g).sign()
    x = torch.randn(256, 64, generator=g)
    y = x @ (w0 + torch.randn(64, 64, generator=g) * 1e-3).T

    def fit(dtype, wrapped, steps=150):
        w = torch.nn.Parameter(w0.clone().to(dtype))
        if wrapped:
            opt = make_optimizer([w], OptimizerChoice("adamw", "bf16"), lr=1e-5, weight_decay=0.0, seed=1)
        else:
            opt = torch.optim.AdamW([w], lr=1e-5, weight_decay=0.0)
        start = float(torch.nn.functional.mse_loss(x @ w.detach().float().T, y))
        for _ in range(steps):
            torch.nn.functional.mse_loss(x.to(dtype) @ w.T, y.to(dtype)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return w.detach().float(), start, float(torch.nn.functional.mse_loss(x @ w.detach().float().T, y))

    w32, start32, end32 = fit(torch.float32, wrapped=False)
    w_plain, start_plain, end_plain = fit(torch.bfloat16, wrapped=False)
    w_sr, start_sr, end_sr = fit(torch.bfloat16, wrapped=True)
    assert torch.equal(w_plain, w0.bfloat16().float()), "plain bf16 updates were expected to round away"
    assert end_plain == start_plain
    drop32, drop_sr = start32 - end32, start_sr - end_sr
    assert drop32 > 0.3 * start32
    assert 0.8 * drop32 < drop_sr < 1.2 * drop32, (drop32, drop_sr)
    moved32, moved_sr = (w32 - w0).abs().mean(), (w_sr - w0).abs().mean()
    assert 0.8 < float(moved_sr / moved32) < 1.2


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    hi = torch.nextafter(lo, torch.tensor(2.0, dtype=torch.bfloat16))
    x = torch.full((20000,), float(lo) + 0.3 * (float(hi) - float(lo)))
    r = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0))
    assert r.dtype == torch.bfloat16 and set(r.float().unique().tolist()) == {float(lo), float(hi)}
    assert abs(float((r == hi).float().mean()) - 0.3) < 0.02
    assert torch.equal(stochastic_round_to_bf16(-x, torch.Generator().manual_seed(0)), -r)
    exact = torch.tensor([0.0, -2.0, 0.5])
    assert torch.equal(stochastic_round_to_bf16(exact, torch.Generator()).float(), exact)
    with pytest.raises(TypeError, match="float32"):
        stochastic_round_to_bf16(x.double(), torch.Generator())


@pytest.mark.parametrize("choice", CHOICES)
def test_memory_accounting_per_optimizer(choice):
    """Optimizer state per trainable weight: AdamW 8 bytes, 8-bit AdamW ~2, Adafactor less than AdamW;
    bf16 halves the weights (the optimizer state stays fp32: updates are computed in fp32)."""
    if _needs_missing_bitsandbytes(choice):
        return
    net = _network(choice)
    opt = make_optimizer(net.parameters(), choice, lr=1e-3, weight_decay=0.0)
    _train(net, opt, range(1))
    n = sum(p.numel() for p in net.parameters())
    assert parameter_bytes(net.parameters()) == n * (2 if choice.weights_dtype == "bf16" else 4)
    per_weight = optimizer_state_bytes(opt) / n
    expected = {"adamw": (8.0, 8.1), "adamw8bit": (2.0, 2.6), "adafactor": (2.0, 4.0)}[choice.kind]
    assert expected[0] <= per_weight <= expected[1], per_weight


def test_cli_optimizer_options_and_low_vram_preset(capsys, monkeypatch):
    a = parse_args(["--ckpt", "x", "--out", "o.safetensors"])
    assert (a.optimizer, a.weights_dtype, a.low_vram) == ("adamw", "fp32", False)  # the official recipe
    help_text = build_parser().format_help()
    for name in ("--optimizer", "--weights-dtype", "--low-vram", "bitsandbytes", "stochastically rounded"):
        assert name in help_text

    for installed, optimizer in ((True, "adamw8bit"), (False, "adafactor")):
        monkeypatch.setattr(cli, "bitsandbytes_installed", lambda: installed)
        a = parse_args(["--ckpt", "x", "--out", "o.safetensors", "--low-vram"])
        assert (a.optimizer, a.weights_dtype, a.mixed_precision, a.gradient_checkpointing, a.batch_size,
                a.grad_accum) == (optimizer, "bf16", "bf16", True, 1, 16)
        printed = capsys.readouterr().err
        assert f"--low-vram: --optimizer {optimizer} --weights-dtype bf16" in printed
        assert "kept as given" not in printed and ("not installed" in printed) == (not installed)

    a = parse_args(["--ckpt", "x", "--out", "o.safetensors", "--low-vram", "--optimizer", "adamw8bit",
                    "--batch-size", "2"])
    assert (a.optimizer, a.batch_size, a.grad_accum, a.weights_dtype) == ("adamw8bit", 2, 16, "bf16")
    assert "kept as given: --optimizer adamw8bit, --batch-size 2" in capsys.readouterr().err

    for bad in (["--optimizer", "sgd"], ["--weights-dtype", "fp16"],
                ["--weights-dtype", "bf16", "--mixed-precision", "fp16"]):
        with pytest.raises(SystemExit):
            parse_args(["--ckpt", "x", "--out", "o.safetensors", *bad])
    assert "use --mixed-precision bf16" in capsys.readouterr().err
