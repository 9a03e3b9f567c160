"""Benchmark: BPS training memory, split into weights, gradients, optimizer state and activations,
and throughput, per optimizer x trainable-weight dtype; plus the loss each reaches on the demo set.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_training.py [--resolution 512] [--batch 1 4]
        [--combos adamw:fp32 adafactor:bf16 ...] [--grad-ckpt on] [--precision bf16] [--steps 2]
        [--rows rows.jsonl] [--output bench/results/training_....txt]
    COMFYUI_PATH=... python bench/bench_training.py --demo-steps 12 --ckpt sd15.safetensors [--rows ...]

Memory/speed rows: each (combination, batch, checkpointing) runs in its own process (so its peak
is its own) the trainer's real step: the steered UNet forward through nodes/steering.py
(SteeredUNet), eps MSE, backward into B_phi, the optimizer of train/optimizers.py. Random
weights, no downloads. Weights, gradients and optimizer state are exact (tensor bytes summed);
activations are the rest of the peak: on a GPU torch.cuda.max_memory_allocated minus the
tensors present before the step and the gradients and optimizer state, on CPU the process's peak
resident set minus its resident set before the first step, the gradients and the optimizer state
(so CPU activations include allocator slack and the optimizer's temporaries). On CPU the UNet is
fp32; the "512 estimate" columns put a 16-bit UNet (what a GPU run uses) next to the measured
B_phi state and the activations scaled by pixel count, an estimate, not a measurement.

Demo-set rows (--demo-steps N): per combination, the real trainer (train_bps.main) trains N
steps on the built-in demo set, then the eps-MSE of the trained adapter on all 40 pairs at fixed
timesteps and noise is compared with the frozen model's (as bench/train_learning.py does).

--rows appends each row as JSON to a file, so a long comparison can run as several invocations
(one per lock slot on a shared machine); --report prints the table of a rows file.
"""

from __future__ import annotations

import argparse
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TFLOPS_PER_SAMPLE_512 = 3.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}
ALL_COMBOS = ["adamw:fp32", "adamw8bit:fp32", "adafactor:fp32", "adamw:bf16", "adamw8bit:bf16", "adafactor:bf16"]
GIB = 2 ** 30


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(resolution: int, batch: int, checkpointing: bool, precision: str, steps: int, combo: str) -> dict:
    """One configuration in this process; returns its measurements."""
    from bench.comfy_unet import boot_comfyui, random_sd15_model

    pack = boot_comfyui()
    import comfy.model_management
    mods = {m: importlib.import_module(f"{pack.__name__}.train.{m}") for m in
            ("steered_unet", "grad_checkpoint", "optimizers")}
    opt_mod = mods["optimizers"]
    device = comfy.model_management.get_torch_device()
    kind, weights_dtype = combo.split(":")
    choice = opt_mod.OptimizerChoice(kind, weights_dtype)

    model = random_sd15_model(torch.float32 if device.type == "cpu" else torch.bfloat16, seed=0)
    # Frozen, as the trainer's loader leaves it: otherwise backward also computes (and keeps)
    # 3.2 GiB of UNet weight gradients that training never uses.
    model.model.requires_grad_(False)
    unet_bytes = opt_mod.parameter_bytes(model.model.diffusion_model.parameters())
    unet_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    torch.manual_seed(0)
    network = pack.bps.BPSNetwork(pack.bps.BPSConfig()).to(device, choice.dtype).train()
    network.gradient_checkpointing = checkpointing
    module = mods["steered_unet"].SteeredUNet(network, model, list(pack.bps.PAPER_OMEGA))
    if checkpointing:
        mods["grad_checkpoint"].checkpoint_unet(model.model.diffusion_model)
    optimizer = opt_mod.make_optimizer(network.parameters(), choice, lr=1e-5, weight_decay=1e-2)
    params = list(network.parameters())
    weights = opt_mod.parameter_bytes(params)
    latent = resolution // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    hint = torch.rand(batch, 1, resolution, resolution, generator=g).to(device)
    context = torch.randn(batch, 77, 768, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).float().to(device)
    target = torch.randn_like(x)
    dtype = DTYPES[precision]
    grads = {"bytes": 0}

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            eps = module(x, t, context, hint)
        loss = torch.nn.functional.mse_loss(eps.float(), target)
        loss.backward()
        grads["bytes"] = opt_mod.gradient_bytes(params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
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
    return {"combo": combo, "batch": batch, "resolution": resolution, "grad_ckpt": checkpointing,
            "precision": precision, "device": str(device), "s_per_step": statistics.median(times),
            "peak_bytes": peak, "before_step_bytes": before, "weights_bytes": weights,
            "grad_bytes": grads["bytes"], "optimizer_bytes": state,
            "activation_bytes": peak - before - grads["bytes"] - state,
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
    lines = ["combination | batch | grad ckpt | s/step | samples/s | weights GiB | gradients GiB | optimizer GiB "
             "| B_phi state GiB | activations GiB | measured peak GiB | model FLOP utilisation"]
    for r in rows:
        state = r["weights_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]
        lines.append(f"{r['combo']} | {r['batch']} | {'on' if r['grad_ckpt'] else 'off'} | {r['s_per_step']:.2f} | "
                     f"{r['batch'] / r['s_per_step']:.3f} | {r['weights_bytes'] / GIB:.2f} | "
                     f"{r['grad_bytes'] / GIB:.2f} | {r['optimizer_bytes'] / GIB:.2f} | {state / GIB:.2f} | "
                     f"{r['activation_bytes'] / GIB:.2f} | {r['peak_bytes'] / GIB:.1f} | {_mfu(r, peak_tflops)}")
    return lines


def _mfu(r: dict, peak_tflops: float) -> str:
    flops = TFLOPS_PER_SAMPLE_512 * 1e12 * (r["resolution"] / 512) ** 2 * r["batch"] / r["s_per_step"]
    return f"{flops / (peak_tflops * 1e12):.1%}" if r.get("gpu") else f"- ({flops / 1e9:.0f} GFLOP/s, {r['device']})"


def _estimate_table(rows: list[dict], target: int) -> list[str]:
    """Whole peak at ``target`` px from the measured B_phi state, a 16-bit UNet and activations.

    Activations split in two: a per-sample part, the slope between the batch sizes measured for
    that weights dtype (B_phi computes in it; the optimizer does not change activations), scaled
    by pixel count; and a fixed part (optimizer temporaries, allocator slack), the combination's
    own smallest-batch activations minus that many samples, not scaled.
    """
    measured = [r for r in rows if r["grad_ckpt"]]
    if not measured:
        return []
    res = measured[0]["resolution"]
    scale = (target / res) ** 2
    unet16 = measured[0]["unet_params"] * 2
    slopes: dict[str, float] = {}
    for combo in {r["combo"] for r in measured}:
        pts = sorted((r["batch"], r["activation_bytes"]) for r in measured if r["combo"] == combo)
        if len(pts) >= 2 and pts[-1][0] > pts[0][0]:
            slopes.setdefault(combo.split(":")[1], (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]))
    lines = [f"estimate at {target}x{target}, grad ckpt on: 16-bit UNet {unet16 / GIB:.2f} GiB + measured B_phi "
             f"state + activations (per-sample slope at {res}px x{scale:.0f} for pixel count, plus the fixed "
             f"rest) | per sample at {target}px GiB | batch 1 GiB | batch 4 GiB"]
    seen = set()
    for r in sorted(measured, key=lambda r: r["batch"]):
        if r["combo"] in seen:
            continue
        seen.add(r["combo"])
        slope = slopes.get(r["combo"].split(":")[1])
        note = ""
        if slope is None or slope <= 0:
            # The peak RSS of a CPU step can be set by the optimizer's temporaries rather than by
            # the backward pass; then use the largest positive slope measured (fp32 activations:
            # an upper bound for bf16 weights).
            positive = [v for v in slopes.values() if v > 0]
            slope, note = (max(positive), " (slope of fp32 rows)") if positive else (None, "")
        if slope is None:
            lines.append(f"{r['combo']} | ? | ? | ?")
            continue
        state = r["weights_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]
        fixed = max(0.0, r["activation_bytes"] - slope * r["batch"])
        est = [(unet16 + state + fixed + slope * scale * b) / GIB for b in (1, 4)]
        lines.append(f"{r['combo']} | {slope * scale / GIB:.2f}{note} | {est[0]:.1f} | {est[1]:.1f}")
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
        lines += _mem_table(mem, peak_tflops) + [""] + _estimate_table(mem, target)
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
        print(json.dumps(run_one(args.resolution, batch, ckpt, args.precision, args.steps, combo)))
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
                "--work", args.work] + (["--ckpt", args.ckpt] if args.ckpt else [])
        for job in jobs:
            t0 = time.time()
            row = _subprocess_row(base + job)
            row.setdefault("combo", json.loads(job[1])[-1] if job[0] == "--one" else json.loads(job[1])[0])
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
