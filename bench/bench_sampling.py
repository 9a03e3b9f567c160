"""Profiling benchmark (in-process, not the user's path): seconds per sampling step with CFG, plain
SD1.5 vs + BPS vs + ComfyUI's ControlNet. For what users see, through ComfyUI's server, use
bench/bench_server.py; this one isolates the sampler for profilers.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_sampling.py [--size 512] [--steps 3] [--repeats 2]

All three run through ComfyUI's own sampler (KSampler path, euler, CFG 7, batch 1 so every UNet
call carries a cond and an uncond row) on random-weight models built from ComfyUI's classes: the
SD1.5 UNet, a full-size BPS adapter (non-zero weights so it really runs), and an SD1.5 ControlNet
made from its config and loaded through ComfyUI's ControlNet loader. The three are run in turn,
repeatedly, in one process, and the median seconds per step is reported with the overheads
relative to the plain model. "bps_cached" is BPS with its residual cache warmed by one run with
the same steps: a workflow re-run with a new seed. The FLOP floor of BPS with CFG sharing is
+30% (B_phi is ~0.60x the UNet's FLOPs and runs once per (timestep, hint) instead of once per
CFG row); ControlNet costs about +35% in FLOPs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.comfy_unet import comfyui_available, comfy_version  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default: 512)")
    parser.add_argument("--steps", type=int, default=3, help="sampling steps per run (default: 3)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each setup (default: 2)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="UNet dtype (default: ComfyUI's choice: fp32 on CPU, fp16/bf16 on GPU)")
    args = parser.parse_args()
    if not comfyui_available():
        sys.exit("bench_sampling needs the real ComfyUI: set COMFYUI_PATH to a ComfyUI checkout")
    from bench.sampling_setups import build_setups
    setups, describe = build_setups(args.size, DTYPES.get(args.dtype))
    print(f"# {describe} comfyui={comfy_version()} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} size={args.size} steps={args.steps} cfg=7 batch=1")

    times: dict[str, list[float]] = {name: [] for name in setups}
    for name, run in setups.items():  # warm-up: loads weights, builds caches
        run(args.steps if name == "bps_cached" else 1)  # the cache needs this run's timesteps
    for _ in range(args.repeats):
        for name, run in setups.items():
            start = time.perf_counter()
            run(args.steps)
            times[name].append((time.perf_counter() - start) / args.steps)

    plain = statistics.median(times["plain"])
    print("setup | s/step (median) | overhead vs plain")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name} | {med:.3f} | {med / plain - 1:+.1%}")
    bps = statistics.median(times["bps"]) / plain - 1
    cn = statistics.median(times["controlnet"]) / plain - 1
    print(f"# BPS overhead / FLOP floor (+30%): {(1 + bps) / 1.30:.3f}x (target <= 1.15x); "
          f"BPS overhead below ControlNet's: {bps < cn}")


if __name__ == "__main__":
    main()
