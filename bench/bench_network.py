"""Benchmark: one B_phi forward against one SD1.5 UNet forward at 512x512 (64x64 latents).

    python bench/bench_network.py [--batch 1 2] [--repeats 3] [--dtype fp32|fp16|bf16] [--device cpu|cuda]

Both models get random weights (no downloads). With COMFYUI_PATH set, the UNet is ComfyUI's own
SD1.5 UNet and the ratio B_phi / UNet is printed; without it only B_phi is timed. The two are
timed alternately in one process so drift on a shared machine hits both alike; the median is
reported. Also prints the parameter count and the size of the adapter file in fp16.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bps import BPSConfig, BPSNetwork, save_adapter  # noqa: E402
from bench.comfy_unet import build_sd15_unet, comfy_version  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2], help="batch sizes (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model and batch (default: 3)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default: 512)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="compute dtype (default: fp32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    net = BPSNetwork(BPSConfig()).to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in net.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.safetensors")
        save_adapter(path, net, dtype=torch.float16)
        file_mb = os.path.getsize(path) / 2 ** 20

    unet = build_sd15_unet(device, dtype)
    print(f"# device={device} dtype={args.dtype} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"cpu={platform.processor() or platform.machine()}"
          + (f" gpu={torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
          + (f" comfyui={comfy_version()}" if unet is not None else " (COMFYUI_PATH unset: no UNet comparison)"))
    print(f"# B_phi parameters: {params:,} (official count 692,370,894 incl. 20,277,760 unused zero-conv "
          f"numbers and 14 scalars); fp16 adapter file: {file_mb:,.1f} MiB")

    latent = args.size // 8
    print("batch | B_phi s (median) | UNet s (median) | B_phi / UNet")
    with torch.inference_mode():
        for batch in args.batch:
            hint = torch.rand(batch, 1, args.size, args.size, device=device, dtype=dtype)
            emb = torch.randn(batch, 1280, device=device, dtype=dtype)
            x = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
            t = torch.full((batch,), 500.0, device=device)
            ctx = torch.randn(batch, 77, 768, device=device, dtype=dtype)
            run_net = lambda: net(hint, emb)  # noqa: E731
            run_unet = (lambda: unet(x, t, context=ctx)) if unet is not None else None  # noqa: E731
            run_net()  # warm-up
            if run_unet:
                run_unet()
            net_times, unet_times = [], []
            for _ in range(args.repeats):
                net_times.append(_time(run_net, device))
                if run_unet:
                    unet_times.append(_time(run_unet, device))
            n = statistics.median(net_times)
            if unet_times:
                u = statistics.median(unet_times)
                print(f"{batch} | {n:.3f} | {u:.3f} | {n / u:.2f}")
            else:
                print(f"{batch} | {n:.3f} | - | -")


if __name__ == "__main__":
    main()
