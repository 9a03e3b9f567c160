"""Benchmark: BPS training throughput and peak memory, per batch size, with and without
gradient checkpointing.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_training.py [--resolution 512] [--batch 1 4 16]
        [--precision bf16] [--steps 3] [--output bench/results/training_....txt]

Each configuration runs in its own process (so its peak memory is its own) the trainer's real
step: the steered UNet forward through nodes/steering.py (SteeredUNet), epsilon MSE, backward into
B_phi, AdamW. Random weights, no downloads. Prints samples/s, the speed with checkpointing relative
to without it (same batch, same run), peak memory (GPU: max allocated; CPU: the process's max
resident set, weights and optimizer state included) and, on a GPU, model FLOP utilisation
against the bf16 peak given by --peak-tflops (one 512x512 sample costs about 3 TFLOPs: UNet
forward and input-gradient backward plus B_phi forward and backward; it scales with the pixel
count).
"""

from __future__ import annotations

import argparse
import json
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


def run_one(resolution: int, batch: int, checkpointing: bool, precision: str, steps: int) -> dict:
    """One configuration in this process; returns its measurements."""
    from bench.comfy_unet import boot_comfyui, random_sd15_model

    pack = boot_comfyui()
    import comfy.model_management
    import importlib
    steered_unet = importlib.import_module(f"{pack.__name__}.train.steered_unet")
    grad_checkpoint = importlib.import_module(f"{pack.__name__}.train.grad_checkpoint")
    device = comfy.model_management.get_torch_device()

    model = random_sd15_model(torch.float32 if device.type == "cpu" else torch.bfloat16, seed=0)
    network = pack.bps.BPSNetwork(pack.bps.BPSConfig()).to(device).train()
    network.gradient_checkpointing = checkpointing
    module = steered_unet.SteeredUNet(network, model, list(pack.bps.PAPER_OMEGA))
    if checkpointing:
        grad_checkpoint.checkpoint_unet(model.model.diffusion_model)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-5)
    latent = resolution // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    hint = torch.rand(batch, 1, resolution, resolution, generator=g).to(device)
    context = torch.randn(batch, 77, 768, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).float().to(device)
    target = torch.randn_like(x)
    dtype = DTYPES[precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            eps = module(x, t, context, hint)
        loss = torch.nn.functional.mse_loss(eps.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: loads the UNet, allocates optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"device": str(device), "s_per_step": statistics.median(times), "peak_bytes": peak,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512, help="training side in pixels (default: 512)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16], help="batch sizes (default: 1 4 16)")
    parser.add_argument("--precision", choices=DTYPES, default="bf16", help="autocast dtype (default: bf16)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default: 3)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="GPU bf16 dense peak for the utilisation column (default: 989, H100 SXM)")
    parser.add_argument("--output", help="also write the table to this file (e.g. bench/results/...)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        batch, ckpt = json.loads(args.one)
        print(json.dumps(run_one(args.resolution, batch, ckpt, args.precision, args.steps)))
        return

    import platform
    from bench.comfy_unet import comfy_version, comfyui_available
    if not comfyui_available():
        sys.exit("bench_training.py needs the real ComfyUI: set COMFYUI_PATH to a ComfyUI checkout")
    lines = [f"# command: COMFYUI_PATH=/path/to/ComfyUI python bench/bench_training.py {' '.join(sys.argv[1:])}",
             f"# resolution={args.resolution} precision={args.precision} timed_steps={args.steps} "
             f"torch={torch.__version__} comfyui={comfy_version()} threads={torch.get_num_threads()} "
             f"machine={platform.machine()}",
             "# full SD1.5 adapter (672M trainable parameters), AdamW; one process per row",
             "batch | grad ckpt | s/step | samples/s | ckpt on / off speed | peak memory GiB | model FLOP utilisation"]
    print("\n".join(lines), flush=True)
    speed_off: dict[int, float] = {}
    for batch in args.batch:
        for ckpt in (False, True):
            cmd = [sys.executable, __file__, "--resolution", str(args.resolution), "--precision", args.precision,
                   "--steps", str(args.steps), "--one", json.dumps([batch, ckpt])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                line = f"{batch} | {'on' if ckpt else 'off'} | failed: {tail}"
            else:
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                sps = batch / r["s_per_step"]
                if not ckpt:
                    speed_off[batch] = sps
                ratio = f"{sps / speed_off[batch]:.2f}x" if ckpt and batch in speed_off else "-"
                flops = TFLOPS_PER_SAMPLE_512 * 1e12 * (args.resolution / 512) ** 2 * sps
                mfu = f"{flops / (args.peak_tflops * 1e12):.1%}" if r["gpu"] else f"- ({flops / 1e9:.0f} GFLOP/s)"
                line = (f"{batch} | {'on' if ckpt else 'off'} | {r['s_per_step']:.2f} | {sps:.3f} | {ratio} | "
                        f"{r['peak_bytes'] / 2**30:.1f} | {mfu}  ({r['gpu'] or r['device']})")
            print(line, flush=True)
            lines.append(line)
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
