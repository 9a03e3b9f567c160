"""bench/bench_training.py: the peak estimate, and the SDXL rows' frozen UNet (16-bit, no fp32 copies)."""

import sys
from pathlib import Path

import pytest
import torch

import comfy_host

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

bench_training = pytest.importorskip("bench.bench_training", reason="bench/bench_training.py needs torch")

GIB = 2 ** 30


def _row(combo, batch, act_gib, *, res=128, ckpt=True, state=(1, 1, 1), params=1000, temp_gib=0.0):
    w, g, o = (int(v * GIB) for v in state)
    return {"combo": combo, "batch": batch, "resolution": res, "grad_ckpt": ckpt, "precision": "bf16",
            "base": "sdxl", "unet_dtype": "bfloat16", "activation_bytes": int(act_gib * GIB),
            "optimizer_temp_bytes": int(temp_gib * GIB), "weights_bytes": w,
            "grad_bytes": g, "optimizer_bytes": o, "unet_params": params, "peak_bytes": 0, "s_per_step": 1.0,
            "device": "cpu"}


def test_estimate_scales_the_per_sample_slope_by_pixels_and_keeps_the_fixed_part():
    rows = [_row("adamw8bit:bf16", 1, 1.0), _row("adamw8bit:bf16", 2, 1.25),
            _row("adafactor:bf16", 1, 1.5, state=(1, 1, 2))]
    est = {e["combo"]: e for e in bench_training.estimate_peaks(rows, target=1024)}
    # 0.25 GiB a sample at 128 px is 16 GiB at 1024 (64x the pixels); the rest of batch 1 is fixed.
    assert est["adamw8bit:bf16"]["per_sample"] == pytest.approx(16 * GIB)
    assert est["adamw8bit:bf16"]["fixed"] == pytest.approx(0.75 * GIB)
    assert est["adamw8bit:bf16"]["peaks"][1] == pytest.approx(2000 + 3 * GIB + 0.75 * GIB + 16 * GIB)
    assert est["adamw8bit:bf16"]["peaks"][4] == pytest.approx(2000 + 3 * GIB + 0.75 * GIB + 64 * GIB)
    # One batch size only: the slope of its weights dtype, its own fixed part and state.
    assert est["adafactor:bf16"]["fixed"] == pytest.approx(1.25 * GIB)
    assert est["adafactor:bf16"]["peaks"][1] == pytest.approx(2000 + 4 * GIB + 1.25 * GIB + 16 * GIB)


def test_the_optimizer_temporaries_count_only_where_they_exceed_the_activations():
    rows = [_row("adamw8bit:bf16", 1, 0.25, temp_gib=1.0), _row("adamw8bit:bf16", 2, 0.5, temp_gib=1.0)]
    (est,) = bench_training.estimate_peaks(rows, target=256)
    # activations: 0.25 GiB a sample at 128 px, 1 GiB at 256 px, nothing fixed
    assert est["per_sample"] == pytest.approx(GIB) and est["fixed"] == pytest.approx(0)
    assert est["peaks"][1] == pytest.approx(2000 + 3 * GIB + 1.0 * GIB)  # the optimizer's 1 GiB sets it
    assert est["peaks"][4] == pytest.approx(2000 + 3 * GIB + 4.0 * GIB)  # the activations set it


def test_estimate_without_a_positive_slope_says_so():
    rows = [_row("adamw:fp32", 1, 1.0), _row("adamw:fp32", 2, 0.9)]
    (est,) = bench_training.estimate_peaks(rows, target=512)
    assert "peaks" not in est and est["note"] == "no slope"
    rows += [_row("adamw:bf16", 1, 1.0), _row("adamw:bf16", 2, 1.5)]
    est = {e["combo"]: e for e in bench_training.estimate_peaks(rows, target=256)}
    assert est["adamw:fp32"]["note"] == "slope of other weights dtype"
    assert est["adamw:fp32"]["per_sample"] == pytest.approx(0.5 * GIB * 4)


def test_each_resolution_and_checkpointing_setting_gets_its_own_estimate():
    rows = [_row("adamw8bit:bf16", b, a, res=res, ckpt=ckpt) for res, ckpt, pts in
            [(128, True, (1.0, 1.25)), (256, True, (1.5, 2.5)), (128, False, (2.0, 3.0))]
            for b, a in zip((1, 2), pts)]
    lines = bench_training._estimate_table(rows, 1024)
    headers = [line for line in lines if line.startswith("estimate at")]
    assert len(headers) == 3
    assert any("grad ckpt off, from the 128px" in h for h in headers)
    per_sample = [line.split(" | ")[1] for line in lines if line.startswith("adamw8bit:bf16")]
    # 0.25 GiB x64, 1.0 GiB x16 and 1.0 GiB x64 a sample at 1024 px
    assert sorted(float(v) for v in per_sample) == [16.0, 16.0, 64.0]


def test_a_16_bit_unet_on_the_cpu_needs_autocast_in_its_own_dtype():
    cpu = torch.device("cpu")
    assert bench_training.precision_problem(torch.bfloat16, "no", cpu).endswith("--unet-dtype fp32")
    assert "--precision fp16" in bench_training.precision_problem(torch.float16, "bf16", cpu)
    assert bench_training.precision_problem(torch.bfloat16, "bf16", cpu) is None
    assert bench_training.precision_problem(torch.float32, "no", cpu) is None
    assert bench_training.unet_weight_dtype("auto", cpu) == torch.float32


@pytest.fixture(scope="module")
def trainer(comfyui_host):
    """The pack as the trainer (and the benchmark) imports it."""
    return comfy_host.trainer_pack()


def _weight_copy_bytes_saved(model, y: torch.Tensor, precision: str) -> tuple[int, int]:
    """(bytes of copies of the UNet's weights that autograd keeps for the backward pass of one
    forward with gradients, bytes of those weights), on the CPU, x in fp32 as the trainer gives it."""
    unet = model.model.diffusion_model
    weights = [p for p in unet.parameters() if p.ndim >= 2]
    shapes = {tuple(p.shape) for p in weights}
    own = {p.data_ptr() for p in weights}
    copies: dict[int, int] = {}

    def pack_hook(t):
        if tuple(t.shape) in shapes and t.data_ptr() not in own:
            copies[t.data_ptr()] = t.numel() * t.element_size()
        return t

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g, requires_grad=True)  # stands in for B_phi's residuals
    context = torch.randn(1, 77, 2048, generator=g)
    dtype = bench_training.DTYPES[precision]
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t), \
            torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = unet(x, torch.tensor([500.0]), context=context, y=y)
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    return sum(copies.values()), sum(p.numel() * p.element_size() for p in weights)


def test_the_sdxl_rows_bf16_unet_keeps_no_weight_copies_for_backward(trainer):
    import sdxl_models

    rc = trainer.train.random_checkpoint
    y = torch.randn(1, 2816, generator=torch.Generator().manual_seed(1))
    model = bench_training.frozen_model(trainer, "sdxl", torch.bfloat16, sdxl_models.reduced_sdxl_config(rc))
    assert model.model.diffusion_model.input_blocks[1][0].in_layers[2].weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.model.parameters())
    # Under bf16 autocast ComfyUI's per-layer cast is a no-op but for the first and last layers
    # and the embeddings, which take fp32 inputs (a few MB at full size).
    copied, total = _weight_copy_bytes_saved(model, y, "bf16")
    assert copied < 0.05 * total
    # The precision bench_training refuses for a bf16 UNet: an fp32 copy of most weights is kept.
    assert bench_training.precision_problem(torch.bfloat16, "no", torch.device("cpu"))
    copied, total = _weight_copy_bytes_saved(model, y, "no")
    assert copied > total  # fp32 copies (twice the bytes) of all weights the input gradient needs


def test_an_sdxl_row_trains_sdxl_b_phi_through_the_trainer_module(trainer):
    import sdxl_models

    pack, rc = trainer, trainer.train.random_checkpoint
    row = bench_training.run_one(64, 2, True, "bf16", 1, "adafactor:bf16", "sdxl", "bf16",
                                 sdxl_models.reduced_sdxl_config(rc))
    assert (row["base"], row["unet_dtype"], row["grad_ckpt"]) == ("sdxl", "bfloat16", True)
    shape = pack.bps.UNetShape.from_unet_config(sdxl_models.reduced_sdxl_config(rc))
    net = pack.bps.BPSNetwork(pack.bps.BPSConfig.for_unet(shape))
    n = sum(p.numel() for p in net.parameters())
    assert row["weights_bytes"] == row["grad_bytes"] == 2 * n  # bf16 weights, every one trained
    assert row["unet_params"] == sum(p.numel() for p in
                                     rc.random_sdxl_model(sdxl_models.reduced_sdxl_config(rc)).model
                                     .diffusion_model.parameters())
    assert row["optimizer_bytes"] > 0 and row["s_per_step"] > 0 and row["peak_bytes"] >= row["before_step_bytes"]
    # Traced allocations, not the resident set: a second sample holds more activations, always.
    assert row["activation_source"] == "torch.profiler allocations"
    one = bench_training.run_one(64, 1, True, "bf16", 1, "adafactor:bf16", "sdxl", "bf16",
                                 sdxl_models.reduced_sdxl_config(rc))
    assert 0 < one["activation_bytes"] < row["activation_bytes"]
