"""Benchmark: BPS training memory, split into weights, gradients, optimizer state and activations,
and throughput, per optimizer x trainable-weight dtype; plus the loss each reaches on the demo set.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_training.py [--resolution 512] [--batch 1 4]
        [--combos adamw:fp32 adafactor:bf16 ...] [--grad-ckpt on] [--precision bf16] [--steps 2]
        [--base sd15|sdxl] [--unet-dtype auto|fp32|bf16|fp16] [--target-resolution 512]
        [--rows rows.jsonl] [--output bench/results/training_....txt]
    COMFYUI_PATH=... python bench/bench_training.py --demo-steps 12 --ckpt sd15.safetensors [--rows ...]

Memory/speed rows: each (combination, batch, checkpointing) runs in its own process (so its peak
is its own) the trainer's real step: the steered UNet forward through nodes/steering.py
(SteeredUNet), eps MSE, backward into B_phi, the optimizer of train/optimizers.py. Random
weights, no downloads. Weights, gradients and optimizer state are exact (tensor bytes summed);
activations are measured on one more step whose gradients are allocated beforehand, phase by
phase (see ``phase_peaks``): the most tensor bytes held at once during the forward and backward
pass beyond those held before the step; and, apart, the optimizer step's temporaries, which at
small sizes can set the step's peak but do not grow with the pixels. On a
GPU both come from torch.cuda.max_memory_allocated, on CPU from torch.profiler's allocation
events. The "measured peak" column is the process's whole peak (on CPU its resident set, reset
with /proc/self/clear_refs and free heap returned with malloc_trim just before the first step),
which on CPU also holds what the C allocator keeps: at small sizes that noise is larger than the
activations (SDXL at 128 px: batch 2 came out below batch 1).

``--base sdxl`` runs the full-size SDXL UNet (2.57B parameters, random weights) with SDXL's
B_phi (405M) and inputs (2048-wide text context, 2816-wide ``y``). ``--unet-dtype`` is the frozen
UNet's weight dtype: ``auto`` is fp32 on CPU (bf16 on a GPU). A 16-bit UNet on a CPU needs
``--precision`` of the same dtype: then it computes in that dtype, as a GPU run with
``--mixed-precision bf16`` (``--low-vram``) does, in half the RAM, and ComfyUI's per-layer cast
copies no weight (in another precision autograd would keep a copy of every weight for backward).

The estimate table puts a 16-bit UNet (what a GPU run uses) next to the measured B_phi state and
the activations scaled by pixel count to ``--target-resolution``, per measured resolution and
checkpointing setting: an estimate, not a measurement.

Demo-set rows (--demo-steps N): per combination, the real trainer (train_bps.main) trains N
steps on the built-in demo set, then the eps-MSE of the trained adapter on all 40 pairs at fixed
timesteps and noise is compared with the frozen model's (as bench/train_learning.py does).

--rows appends each row as JSON to a file, so a long comparison can run as several invocations
(one per lock slot on a shared machine); --report prints the table of a rows file.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TFLOPS_PER_SAMPLE_512 = 3.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}
ALL_COMBOS = ["adamw:fp32", "adamw8bit:fp32", "adafactor:fp32", "adamw:bf16", "adamw8bit:bf16", "adafactor:bf16"]
GIB = 2 ** 30


BASES = ("sd15", "sdxl")
UNET_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _start_peak_rss() -> None:
    """Hand free heap back to the system and restart the peak resident set from here (Linux;
    elsewhere the peak stays the process's lifetime peak)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM, and so ru_maxrss) to the current RSS
    except OSError:
        pass


def phase_peaks(phases: list[Callable[[], None]], device: torch.device) -> list[int]:
    """Run ``phases`` in turn; for each, the most tensor bytes held at once while it ran beyond those
    held when the first began (what is still held from earlier phases counts).

    On a GPU from ``torch.cuda.max_memory_allocated``; on a CPU from torch.profiler's allocation
    events (every allocation and free through PyTorch's CPU allocator, in order): the CPU analogue,
    without what the C allocator keeps or hands back late, which at small sizes swamps the
    activations in the resident set."""
    from torch.profiler import ProfilerActivity, profile

    held, peaks = 0, []
    for phase in phases:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            phase()
            torch.cuda.synchronize()
            peaks.append(held + torch.cuda.max_memory_allocated() - start)
            held += torch.cuda.memory_allocated() - start
            continue
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            phase()
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        peak = held
        for e in sorted(events, key=lambda e: e.start_ns()):
            held += e.nbytes()
            peak = max(peak, held)
        peaks.append(peak)
    return peaks


def unet_weight_dtype(name: str, device: torch.device) -> torch.dtype:
    """The frozen UNet's weight dtype for ``--unet-dtype`` (auto: fp32 on CPU, bf16 on a GPU)."""
    return UNET_DTYPES[name] or (torch.float32 if device.type == "cpu" else torch.bfloat16)


def precision_problem(unet_dtype: torch.dtype, precision: str, device: torch.device) -> str | None:
    """Why ``--precision`` cannot measure a UNet of ``unet_dtype`` on ``device`` (None: it can).

    On a CPU ComfyUI casts each 16-bit layer's weights to the dtype of its input as it runs. Under
    autocast in the weights' own dtype that cast is a no-op, as on a GPU; in any other precision
    every cast weight is a copy that autograd keeps for the backward pass (the whole UNet again,
    in fp32 for ``--precision no``), which no GPU run holds."""
    if device.type == "cpu" and unet_dtype != torch.float32 and DTYPES[precision] != unet_dtype:
        name = next(k for k, v in DTYPES.items() if v == unet_dtype)
        return (f"a {name} UNet on the CPU runs without weight copies only under {name} autocast: pass "
                f"--precision {name}, or --unet-dtype fp32")
    return None


def frozen_model(pack, base: str, dtype: torch.dtype, unet_config: dict | None = None):
    """The frozen base model (random weights, ``dtype``, ComfyUI's manual cast set up as for a loaded
    checkpoint) a row trains against: a ComfyUI ModelPatcher. ``unet_config``: another SDXL layout
    (tests use a reduced one)."""
    rc = pack.train.random_checkpoint
    if base == "sdxl":
        model = rc.random_sdxl_model(unet_config, dtype=dtype, seed=0)
    else:
        model = rc.random_sd15_model(dtype, seed=0)
    # Frozen, as the trainer's loader leaves it: otherwise backward also computes (and keeps)
    # gradients of every UNet weight, which training never uses.
    model.model.requires_grad_(False)
    return model


def run_one(resolution: int, batch: int, checkpointing: bool, precision: str, steps: int, combo: str,
            base: str = "sd15", unet_dtype: str = "auto", unet_config: dict | None = None) -> dict:
    """One configuration in this process; returns its measurements."""
    from bench.comfy_unet import boot_comfyui

    pack = boot_comfyui()
    import comfy.model_management
    mods = {m: importlib.import_module(f"{pack.__name__}.train.{m}") for m in
            ("steered_unet", "grad_checkpoint", "optimizers", "random_checkpoint")}
    opt_mod = mods["optimizers"]
    device = comfy.model_management.get_torch_device()
    kind, weights_dtype = combo.split(":")
    choice = opt_mod.OptimizerChoice(kind, weights_dtype)
    weight_dtype = unet_weight_dtype(unet_dtype, device)
    problem = precision_problem(weight_dtype, precision, device)
    if problem:
        raise ValueError(problem)

    model = frozen_model(pack, base, weight_dtype, unet_config)
    unet = model.model.diffusion_model
    unet_bytes = opt_mod.parameter_bytes(unet.parameters())
    unet_params = sum(p.numel() for p in unet.parameters())
    shape = pack.nodes.steering.model_unet_shape(model)
    ports = pack.bps.port_map(shape)
    torch.manual_seed(0)
    network = pack.bps.BPSNetwork(pack.bps.BPSConfig.for_unet(shape)).to(device, choice.dtype).train()
    network.gradient_checkpointing = checkpointing
    module = mods["steered_unet"].SteeredUNet(network, model, mods["steered_unet"].training_omega("paper", ports),
                                              shape)
    if checkpointing:
        mods["grad_checkpoint"].checkpoint_unet(unet)
    optimizer = opt_mod.make_optimizer(network.parameters(), choice, lr=1e-5, weight_decay=1e-2)
    params = list(network.parameters())
    weights = opt_mod.parameter_bytes(params)
    latent = resolution // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    hint = torch.rand(batch, 1, resolution, resolution, generator=g).to(device)
    context = torch.randn(batch, 77, model.model.model_config.unet_config["context_dim"], generator=g).to(device)
    # SDXL's y: pooled text + size/crop embedding (random here: its values change no memory)
    adm = getattr(model.model, "adm_channels", 0)
    y = torch.randn(batch, adm, generator=g).to(device) if adm else None
    t = torch.randint(0, 1000, (batch,), generator=g).float().to(device)
    target = torch.randn_like(x)
    dtype = DTYPES[precision]
    grads = {"bytes": 0}

    def forward_backward() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            eps = module(x, t, context, hint, y)
        loss = torch.nn.functional.mse_loss(eps.float(), target)
        loss.backward()
        grads["bytes"] = opt_mod.gradient_bytes(params)

    def optimizer_step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step() -> None:
        forward_backward()
        optimizer_step()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        gc.collect()
        _start_peak_rss()
        before = _rss_bytes()
    times = []
    for i in range(steps + 1):  # step 0 allocates the optimizer state and is not timed
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes()
    state = opt_mod.optimizer_state_bytes(optimizer)
    # One more step, measured phase by phase: the forward and backward pass holds the activations
    # (they grow with the pixels), the optimizer step its temporaries (they do not); at small sizes
    # the second can set the step's peak. The gradients are allocated before it (backward adds into
    # them), so neither phase counts them: they are in the B_phi state, held whole at the peak.
    for p in params:
        p.grad = torch.zeros_like(p)
    fwd_bwd, opt_peak = phase_peaks([forward_backward, optimizer_step], device)
    return {"combo": combo, "batch": batch, "resolution": resolution, "grad_ckpt": checkpointing,
            "precision": precision, "base": base, "unet_dtype": str(weight_dtype).replace("torch.", ""),
            "device": str(device), "s_per_step": statistics.median(times),
            "peak_bytes": peak, "before_step_bytes": before, "weights_bytes": weights,
            "grad_bytes": grads["bytes"], "optimizer_bytes": state,
            "activation_bytes": fwd_bwd, "optimizer_temp_bytes": opt_peak,
            "activation_source": "cuda max_memory_allocated" if device.type == "cuda" else "torch.profiler allocations",
            "rss_activation_bytes": None if device.type == "cuda" else peak - before - grads["bytes"] - state,
            "unet_bytes": unet_bytes, "unet_params": unet_params,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "torch": torch.__version__, "timed_steps": steps}


def run_demo(combo: str, steps: int, lr: float, batch: int, resolution: int, ckpt: str, work: Path,
             frozen: bool) -> dict:
    """Train ``steps`` steps on the demo set with ``combo`` through the real command line; return
    the trained adapter's eps-MSE on the fixed evaluation set (and the frozen model's if asked)."""
    from bench.comfy_unet import comfy_host
    from bench.train_learning import evaluate

    entry = comfy_host.trainer_entry()
    entry.boot_comfyui(entry.find_comfyui())
    pack = entry.import_pack()
    mod = {m: importlib.import_module(f"{pack.__name__}.train.{m}") for m in
           ("loop", "base_model", "cache", "steered_unet", "demo_data", "images", "dataset", "loss_log")}
    import comfy.model_management
    bm = mod["base_model"]
    base = bm.load_base_models(ckpt, unet_dtype=bm.unet_weight_dtype(
        "no", comfy.model_management.get_torch_device(), bm.checkpoint_unet_dtype(ckpt)))
    data = mod["demo_data"].write_demo_set(work / "data")
    pairs, _ = mod["dataset"].load_pairs(data)
    size = mod["images"].training_size(*mod["images"].image_size(pairs[0].target), resolution)
    cache_mod = mod["cache"]
    cache = cache_mod.TrainingCache(work / "cache", cache_mod.CacheConfig(
        size=size, hint_channels=1, base_identity=cache_mod.checkpoint_identity(ckpt),
        encoder_tag=str(getattr(base.vae, "vae_dtype", ""))))
    keys = cache_mod.sample_keys(pairs, cache.config)
    cache.encode_samples(pairs, keys, base.encode_images)
    cache.encode_prompts([p for pair in pairs for p in pair.prompts], base.encode_text)
    dataset = cache_mod.CachedPairs(cache, keys, pairs)
    items = [dataset[i] for i in range(len(dataset))]
    timesteps = [300, 600]
    omega = mod["steered_unet"].training_omega("paper")
    steered_cls = mod["steered_unet"].SteeredUNet
    result: dict = {"combo": combo, "demo_steps": steps, "lr": lr, "batch": batch, "resolution": resolution,
                    "eval": f"{len(items)} demo pairs x t {timesteps}, fixed noise, own caption"}
    if frozen:
        torch.manual_seed(0)
        fresh = pack.bps.BPSNetwork(pack.bps.BPSConfig())
        result["frozen_loss"] = evaluate(steered_cls, fresh, base, omega, items, timesteps, shuffle=False,
                                         batch=16)["loss"]
        del fresh

    def on_train_end(network):
        network.eval()
        result["trained_loss"] = evaluate(steered_cls, network, base, omega, items, timesteps, shuffle=False,
                                          batch=16)["loss"]

    kind, weights_dtype = combo.split(":")
    out = work / f"{kind}_{weights_dtype}.safetensors"
    argv = ["--ckpt", ckpt, "--data", str(data), "--out", str(out), "--overwrite", "--steps", str(steps),
            "--lr", str(lr), "--batch-size", str(batch), "--grad-accum", "1", "--resolution", str(resolution),
            "--seed", "0", "--save-every", "0", "--num-workers", "0", "--cache-dir", str(work / "cache"),
            "--no-progress", "--optimizer", kind, "--weights-dtype", weights_dtype]
    start = time.perf_counter()
    rc = entry.main(argv, base=base, hooks=mod["loop"].Hooks(on_train_end=on_train_end))
    result["wall_s"] = time.perf_counter() - start
    if rc:
        raise SystemExit(f"training with {combo} failed with exit code {rc}")
    rows = mod["loss_log"].read_loss_log(out.with_name(out.stem + "_checkpoints") / "loss.csv")
    result["train_losses"] = [r["loss"] for r in rows]
    return result


# ---------------------------------------------------------------------------------- reporting

def _mem_table(rows: list[dict], peak_tflops: float) -> list[str]:
    lines = ["base | px | combination | batch | grad ckpt | UNet weights | s/step | samples/s | weights GiB | "
             "gradients GiB | optimizer GiB | B_phi state GiB | activations GiB | optimizer temporaries GiB | "
             "measured peak GiB | model FLOP utilisation"]
    for r in rows:
        state = r["weights_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]
        lines.append(f"{r.get('base', 'sd15')} | {r['resolution']} | {r['combo']} | {r['batch']} | "
                     f"{'on' if r['grad_ckpt'] else 'off'} | {r.get('unet_dtype', '?')} | {r['s_per_step']:.2f} | "
                     f"{r['batch'] / r['s_per_step']:.3f} | {r['weights_bytes'] / GIB:.2f} | "
                     f"{r['grad_bytes'] / GIB:.2f} | {r['optimizer_bytes'] / GIB:.2f} | {state / GIB:.2f} | "
                     f"{r['activation_bytes'] / GIB:.2f} | {r.get('optimizer_temp_bytes', 0) / GIB:.2f} | "
                     f"{r['peak_bytes'] / GIB:.1f} | {_mfu(r, peak_tflops)}")
    return lines


def _mfu(r: dict, peak_tflops: float) -> str:
    flops = TFLOPS_PER_SAMPLE_512 * 1e12 * (r["resolution"] / 512) ** 2 * r["batch"] / r["s_per_step"]
    if r.get("base", "sd15") != "sd15":
        return "-"  # TFLOPS_PER_SAMPLE_512 is SD1.5's
    return f"{flops / (peak_tflops * 1e12):.1%}" if r.get("gpu") else f"- ({flops / 1e9:.0f} GFLOP/s, {r['device']})"


def activation_slopes(rows: list[dict]) -> dict[str, float]:
    """Activation bytes per sample, per trainable-weights dtype, of rows measured alike (one base,
    resolution, checkpointing and precision): the slope between each combination's smallest and
    largest batch. B_phi computes in its weights dtype; the optimizer does not change activations,
    so the first combination of a weights dtype with two batch sizes sets it."""
    slopes: dict[str, float] = {}
    for combo in sorted({r["combo"] for r in rows}):
        pts = sorted((r["batch"], r["activation_bytes"]) for r in rows if r["combo"] == combo)
        if len(pts) >= 2 and pts[-1][0] > pts[0][0]:
            slopes.setdefault(combo.split(":")[1], (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]))
    return slopes


def estimate_peaks(rows: list[dict], target: int, batches: tuple[int, ...] = (1, 4)) -> list[dict]:
    """Whole training peak at ``target`` px per combination, from rows measured alike (see
    :func:`activation_slopes`): a 16-bit UNet, the measured B_phi state (weights, gradients,
    optimizer state), and the larger of the optimizer step's temporaries (measured, not scaled)
    and the activations, in two parts: a per-sample part (the slope) scaled by pixel count, and a
    fixed part (what does not grow with the batch), the combination's own smallest-batch
    activations minus that many samples, not scaled.

    Returns one dict per combination: combo, per_sample (bytes at ``target``), fixed, optimizer_temp,
    state, unet16, peaks ({batch: bytes}) and note (how the slope was chosen)."""
    if not rows:
        return []
    scale = (target / rows[0]["resolution"]) ** 2
    unet16 = rows[0]["unet_params"] * 2
    slopes = activation_slopes(rows)
    out = []
    seen = set()
    for r in sorted(rows, key=lambda r: (r["batch"], r["combo"])):
        if r["combo"] in seen:
            continue
        seen.add(r["combo"])
        slope, note = slopes.get(r["combo"].split(":")[1]), ""
        if slope is None or slope <= 0:
            # The peak RSS of a CPU step can be set by the optimizer's temporaries rather than by
            # the backward pass; then use the largest positive slope measured (of other weights).
            positive = [v for v in slopes.values() if v > 0]
            slope, note = (max(positive), "slope of other weights dtype") if positive else (None, "no slope")
        state = r["weights_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]
        if slope is None:
            out.append({"combo": r["combo"], "note": note, "state": state, "unet16": unet16})
            continue
        fixed = max(0.0, r["activation_bytes"] - slope * r["batch"])
        temp = r.get("optimizer_temp_bytes", 0)
        out.append({"combo": r["combo"], "per_sample": slope * scale, "fixed": fixed, "optimizer_temp": temp,
                    "state": state, "unet16": unet16, "note": note,
                    "peaks": {b: unet16 + state + max(fixed + slope * scale * b, temp) for b in batches}})
    return out


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r.get("base", "sd15"), r["resolution"], r["grad_ckpt"], r["precision"], r.get("unet_dtype", "?"))
        groups.setdefault(key, []).append(r)
    return groups


def _estimate_table(rows: list[dict], target: int) -> list[str]:
    """The estimate of :func:`estimate_peaks` for every group of rows measured alike."""
    lines = []
    for (base, res, ckpt, precision, unet_dtype), group in sorted(_groups(rows).items(), key=str):
        estimates = estimate_peaks(group, target)
        unet16 = estimates[0]["unet16"] if estimates else 0
        lines += ["", f"estimate at {target}x{target}, {base}, grad ckpt {'on' if ckpt else 'off'}, from the {res}px "
                      f"rows ({unet_dtype} UNet, --precision {precision}): 16-bit UNet {unet16 / GIB:.2f} GiB + "
                      f"measured B_phi state + the larger of the optimizer's temporaries and the activations "
                      f"(per-sample slope x{(target / res) ** 2:.0f} for pixel count, plus the fixed rest)",
                  "combination | activations per sample at target GiB | fixed GiB | optimizer temporaries GiB | "
                  "B_phi state GiB | batch 1 GiB | batch 4 GiB"]
        for e in estimates:
            if "peaks" not in e:
                lines.append(f"{e['combo']} | ? | ? | ? | {e['state'] / GIB:.2f} | ? | ? ({e['note']})")
                continue
            note = f" ({e['note']})" if e["note"] else ""
            lines.append(f"{e['combo']} | {e['per_sample'] / GIB:.2f}{note} | {e['fixed'] / GIB:.2f} | "
                         f"{e['optimizer_temp'] / GIB:.2f} | {e['state'] / GIB:.2f} | {e['peaks'][1] / GIB:.1f} | "
                         f"{e['peaks'][4] / GIB:.1f}")
    return lines


def _demo_table(rows: list[dict]) -> list[str]:
    frozen = next((r["frozen_loss"] for r in rows if "frozen_loss" in r), None)
    lines = [f"demo set: eps MSE on the 40 pairs at t 300/600 (frozen model: "
             f"{frozen:.4f})" if frozen is not None else "demo set: eps MSE on the 40 pairs",
             "combination | steps x batch | lr | trained loss | drop vs frozen | wall s"]
    for r in rows:
        drop = f"{1 - r['trained_loss'] / frozen:.1%}" if frozen else "?"
        lines.append(f"{r['combo']} | {r['demo_steps']} x {r['batch']} | {r['lr']:g} | {r['trained_loss']:.4f} | "
                     f"{drop} | {r['wall_s']:.0f}")
    return lines


def report(rows: list[dict], target: int, peak_tflops: float = 989.0) -> list[str]:
    """The tables of a set of rows."""
    mem = [r for r in rows if "peak_bytes" in r and "error" not in r]
    demo = [r for r in rows if "trained_loss" in r]
    lines = []
    if mem:
        lines += _mem_table(mem, peak_tflops) + _estimate_table(mem, target)
    if demo:
        lines += [""] + _demo_table(demo)
    lines += [f"failed: {r['combo']} batch {r.get('batch')}: {r['error']}" for r in rows if "error" in r]
    return lines


def _subprocess_row(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512, help="training side in pixels (default: 512)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (default: 1 4)")
    parser.add_argument("--combos", nargs="+", default=ALL_COMBOS,
                        help="optimizer:weights-dtype pairs (default: all six)")
    parser.add_argument("--grad-ckpt", choices=("on", "off", "both"), default="on",
                        help="gradient checkpointing (default: on)")
    parser.add_argument("--precision", choices=DTYPES, default="bf16", help="autocast dtype (default: bf16)")
    parser.add_argument("--base", choices=BASES, default="sd15",
                        help="the frozen UNet: full-size SD1.5 or SDXL, random weights (default: sd15)")
    parser.add_argument("--unet-dtype", choices=UNET_DTYPES, default="auto",
                        help="the frozen UNet's weight dtype (default auto: fp32 on CPU, bf16 on a GPU); "
                             "bf16/fp16 on a CPU compute in that dtype and need --precision of the same")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row, after one untimed (default: 2)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="GPU bf16 dense peak for the utilisation column (default: 989, H100 SXM)")
    parser.add_argument("--target-resolution", type=int, default=512,
                        help="resolution of the estimate columns (default: 512)")
    parser.add_argument("--demo-steps", type=int, default=0,
                        help="instead of memory rows: train this many steps on the demo set per combination "
                             "and compare losses (default: 0 = off)")
    parser.add_argument("--demo-lr", type=float, default=1e-4, help="learning rate of the demo runs (default: 1e-4)")
    parser.add_argument("--demo-batch", type=int, default=4, help="batch of the demo runs (default: 4)")
    parser.add_argument("--demo-resolution", type=int, default=64, help="side of the demo runs (default: 64)")
    parser.add_argument("--ckpt", help="SD1.5 checkpoint for the demo runs (e.g. a random-weight one)")
    parser.add_argument("--work", default="/tmp/bps_bench_training", help="demo runs' folder")
    parser.add_argument("--rows", help="append every row as JSON to this file")
    parser.add_argument("--report", action="store_true", help="only print the tables of --rows")
    parser.add_argument("--output", help="also write the tables to this file (e.g. bench/results/...)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--one-demo", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        batch, ckpt, combo = json.loads(args.one)
        print(json.dumps(run_one(args.resolution, batch, ckpt, args.precision, args.steps, combo, args.base,
                                 args.unet_dtype)))
        return
    if args.one_demo:
        combo, frozen = json.loads(args.one_demo)
        print(json.dumps(run_demo(combo, args.demo_steps, args.demo_lr, args.demo_batch, args.demo_resolution,
                                  args.ckpt, Path(args.work), frozen)))
        return

    from bench.comfy_unet import comfy_version, comfyui_available
    rows: list[dict] = []
    if args.rows and Path(args.rows).is_file():
        rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
    if not args.report:
        if not comfyui_available():
            sys.exit("bench_training.py needs the real ComfyUI: set COMFYUI_PATH to a ComfyUI checkout")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        problem = precision_problem(unet_weight_dtype(args.unet_dtype, device), args.precision, device)
        if problem and not args.demo_steps:
            sys.exit(problem)
        if args.demo_steps and not args.ckpt:
            sys.exit("--demo-steps needs --ckpt (an SD1.5 checkpoint; train/random_checkpoint.py writes one)")
        header = (f"# torch={torch.__version__} comfyui={comfy_version()} threads={torch.get_num_threads()} "
                  f"machine={platform.machine()} {platform.processor()}")
        print(f"# command: COMFYUI_PATH=... python bench/bench_training.py {' '.join(sys.argv[1:])}\n{header}",
              flush=True)
        ckpts = {"on": [True], "off": [False], "both": [False, True]}[args.grad_ckpt]
        jobs = []
        if args.demo_steps:
            have_frozen = any("frozen_loss" in r for r in rows)
            for i, combo in enumerate(args.combos):
                jobs.append(["--one-demo", json.dumps([combo, not have_frozen and i == 0])])
        else:
            jobs = [["--one", json.dumps([b, c, combo])] for combo in args.combos for b in args.batch for c in ckpts]
        base = [sys.executable, __file__, "--resolution", str(args.resolution), "--precision", args.precision,
                "--steps", str(args.steps), "--demo-steps", str(args.demo_steps), "--demo-lr", str(args.demo_lr),
                "--demo-batch", str(args.demo_batch), "--demo-resolution", str(args.demo_resolution),
                "--work", args.work, "--base", args.base, "--unet-dtype", args.unet_dtype] + (
                    ["--ckpt", args.ckpt] if args.ckpt else [])
        for job in jobs:
            t0 = time.time()
            row = _subprocess_row(base + job)
            row.setdefault("combo", json.loads(job[1])[-1] if job[0] == "--one" else json.loads(job[1])[0])
            if job[0] == "--one":
                row.setdefault("batch", json.loads(job[1])[0])
            row["command"] = " ".join(sys.argv[1:])
            row["host"] = header
            print(json.dumps(row), f"({time.time() - t0:.0f}s)", flush=True)
            rows.append(row)
            if args.rows:
                with open(args.rows, "a") as f:
                    f.write(json.dumps(row) + "\n")
    lines = report(rows, args.target_resolution, args.peak_tflops)
    print("\n".join(lines))
    if args.output:
        commands = sorted({r.get("command", "") for r in rows})
        hosts = sorted({r.get("host", "") for r in rows})
        Path(args.output).write_text("\n".join([f"# command: COMFYUI_PATH=... python bench/bench_training.py {c}"
                                                for c in commands] + hosts + lines) + "\n")


if __name__ == "__main__":
    main()
