"""Benchmark the path users run: ComfyUI's own server, API prompts, plain vs + BPS vs + ControlNet.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_server.py --ckpt sd15.safetensors [--size 256]
        [--steps 3] [--repeats 3] [--mode both|turn|repeat] [--dtype fp16]

Starts ComfyUI's ``main.py`` on a loopback port (tests/comfy_server.py) with this pack as a custom
node, the SD1.5 checkpoint, a full-size adapter written as a file (random non-zero weights, fp16,
as a converted official adapter is) and ComfyUI's SD1.5 ControlNet built from its config, written
as a file. It then queues the API prompts a user would queue:

    CheckpointLoaderSimple -> CLIPTextEncode x2 -> [LoadImage -> BPSLoader -> BPSApply |
    LoadImage + ControlNetLoader -> ControlNetApplyAdvanced] -> KSampler (euler, CFG 7.5) -> SaveLatent

each with a new seed, and reports side by side, for plain / BPS / BPS with a new sketch every
prompt / ControlNet, the seconds per sampling step (from the server's websocket progress events;
the first interval, which includes model loading, is dropped) and per prompt (posting to
execution_success):

* ``turn``: the workflows in turn, ``--repeats`` rounds (every BPS prompt follows another
  workflow, so ComfyUI's cache has dropped the BPS nodes' outputs);
* ``repeat``: each workflow on its own, re-queued with new seeds after one unrecorded switching
  prompt (the residual cache makes BPS re-runs cheap).

"BPS, new sketch" draws a sketch no earlier prompt used, as a user editing the condition does:
nothing of it is cached, so its steps are the cost of computing B_phi at every step, measured
in the same run as the others. Both modes run the workflows in one order and then in the
reverse one, so a machine that speeds up or slows down during the run favours none of them.

It also counts the server's "Requested to load" log lines per prompt (model (re)loads). All
figures are ratios measured in one run, so a busy machine slows all of them alike. ``--dtype``
passes ComfyUI's ``--fp16-unet``/``--bf16-unet`` (GPU only; the CPU computes fp32); on a GPU the
``memory`` phase reports each workflow's peak device memory (torch's allocated bytes from the
server's ``/system_stats``, polled while the prompt runs, after ``/free`` unloads every model, so
each workflow loads only what it needs); it runs by default where the server computes on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from bench.comfy_unet import comfyui_available, comfy_version  # noqa: E402

WORKFLOWS = ("plain", "bps", "bps_new_sketch", "controlnet")
LABELS = {"plain": "plain", "bps": "BPS", "bps_new_sketch": "BPS, new sketch", "controlnet": "ControlNet"}
DTYPE_FLAGS = {"fp32": [], "fp16": ["--fp16-unet"], "bf16": ["--bf16-unet"]}
ADAPTER, CONTROLNET, IMAGE = "bench_sketch.safetensors", "bench_control_sd15.safetensors", "bench_sketch.png"


def sketch_name(kind: str, seed: int) -> str:
    """The condition image a prompt loads: one shared sketch, or a new one per prompt."""
    return f"bench_sketch_{seed}.png" if kind == "bps_new_sketch" else IMAGE


def write_sketch(path: Path, size: int, seed: int) -> None:
    """A random sparse-stroke sketch, as a user's file."""
    import numpy as np
    from PIL import Image

    sketch = (np.random.default_rng(seed).random((size, size)) > 0.85).astype(np.uint8) * 255
    Image.fromarray(sketch).convert("RGB").save(path)


def comfy_commit() -> str:
    """The ComfyUI commit benchmarked: the checkout's HEAD, or the pinned copy's record."""
    root = os.environ.get("COMFYUI_PATH")
    # Only a checkout of its own: in a copy without history git would answer for a repo above it.
    if root and (Path(root) / ".git").exists():
        try:
            return subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    pinned = ROOT.parent / "shared" / "comfyui-host" / "ComfyUI-COMMIT.txt"
    return pinned.read_text().split()[0] + " (pinned copy)" if pinned.is_file() else "unknown commit"


def prompt(kind: str, seed: int, size: int, steps: int, cfg: float) -> dict:
    """The API prompt of one workflow."""
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a house by a lake"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry, low quality"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"bench_{kind}"}},
    }
    if kind != "plain":
        p["5"] = {"class_type": "LoadImage", "inputs": {"image": sketch_name(kind, seed)}}
    if kind.startswith("bps"):
        p["6"] = {"class_type": "BPSLoader", "inputs": {"adapter_name": ADAPTER}}
        p["9"] = {"class_type": "BPSApply", "inputs": {"model": ["1", 0], "bps_adapter": ["6", 0], "image": ["5", 0],
                                                       "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        p["7"]["inputs"]["model"] = ["9", 0]
    elif kind == "controlnet":
        p["6"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
        p["9"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["6", 0], "image": ["5", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        p["7"]["inputs"]["positive"], p["7"]["inputs"]["negative"] = ["9", 0], ["9", 1]
    return p


def write_model_files(base: Path, size: int) -> None:
    """The adapter, the ControlNet and the sketch, as files a user would have."""
    import comfy_host
    from bench.comfy_unet import boot_comfyui

    pack = boot_comfyui()
    bps = pack.bps
    (base / "models" / "bps").mkdir(parents=True, exist_ok=True)
    (base / "models" / "controlnet").mkdir(parents=True, exist_ok=True)
    (base / "input").mkdir(parents=True, exist_ok=True)
    net = comfy_host.steering_network(bps, seed=1)
    bps.save_adapter(base / "models" / "bps" / ADAPTER, net, dtype=torch.float16)
    del net
    import comfy.cldm.cldm
    import comfy.ops
    from safetensors.torch import save_file
    rc = pack.train.random_checkpoint
    config = {k: v for k, v in rc.SD15_UNET_CONFIG.items() if k != "out_channels"}
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                         dtype=torch.float32, device="cpu", **config)
    rc._randomise(control, torch.Generator().manual_seed(2))
    save_file({k: v.half().contiguous() for k, v in control.state_dict().items()},
              str(base / "models" / "controlnet" / CONTROLNET))
    del control
    write_sketch(base / "input" / IMAGE, size, seed=0)
    comfy_host.release_memory()
    gc.collect()


class Run:
    """One prompt's figures."""

    def __init__(self, kind: str, seconds: float, steps: list[float], loads: int, peak_bytes: int | None = None):
        self.kind, self.seconds, self.steps, self.loads, self.peak_bytes = kind, seconds, steps, loads, peak_bytes


class MemoryPoller:
    """Peak of the server's torch-allocated device memory while a prompt runs, from /system_stats
    (torch_vram_total - torch_vram_free: the allocator's active bytes; on the CPU ComfyUI reports
    system RAM there, which says little)."""

    def __init__(self, server, interval: float = 0.1):
        self.server, self.interval, self.peak = server, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _used(self) -> int:
        device = self.server.get_json("/system_stats")["devices"][0]
        return int(device["torch_vram_total"]) - int(device["torch_vram_free"])

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._used())
            except OSError:
                pass  # a busy server may miss a poll; the peak lasts across steps
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemoryPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_prompt(server, kind: str, seed: int, args, *, memory: bool = False) -> Run:
    if kind == "bps_new_sketch":
        write_sketch(server.input_dir / sketch_name(kind, seed), args.size, seed)
    log_before = server.log_path.stat().st_size
    poller = MemoryPoller(server) if memory else contextlib.nullcontext()
    with poller:
        result = server.run(prompt(kind, seed, args.size, args.steps, args.cfg), timeout=1800)
    with open(server.log_path, "rb") as f:
        f.seek(log_before)
        loads = f.read().decode(errors="replace").count("Requested to load")
    steps = result.step_seconds("7")[1:]  # the first interval includes model loading
    run = Run(kind, result.seconds, steps, loads, poller.peak if memory else None)
    peak = f", peak {run.peak_bytes / 2 ** 30:.2f} GiB" if memory else ""
    print(f"#   {kind:14s} seed {seed}: {run.seconds:7.2f} s/prompt, steps {[round(s, 2) for s in steps]}, "
          f"model loads {loads}{peak}", flush=True)
    return run


def table(title: str, runs: list[Run]) -> str:
    """Medians per workflow, each as a ratio to plain's, as a Markdown-ish table."""
    per = {k: [r for r in runs if r.kind == k] for k in WORKFLOWS}
    med_prompt = {k: statistics.median(r.seconds for r in v) for k, v in per.items()}
    med_step = {k: statistics.median(s for r in v for s in r.steps) for k, v in per.items()}
    lines = [f"## {title}", "workflow | prompts | s/prompt (median) | x plain | steps | s/step (median) | x plain | "
                            "model loads/prompt"]
    for k in WORKFLOWS:
        loads = statistics.mean(r.loads for r in per[k])
        n_steps = sum(len(r.steps) for r in per[k])
        lines.append(f"{LABELS[k]} | {len(per[k])} | {med_prompt[k]:.2f} | {med_prompt[k] / med_prompt['plain']:.3f} | "
                     f"{n_steps} | {med_step[k]:.3f} | {med_step[k] / med_step['plain']:.3f} | {loads:.1f}")
    return "\n".join(lines)


def memory_table(title: str, runs: list[Run]) -> str:
    lines = [f"## {title}", "workflow | peak torch-allocated GiB | x plain"]
    plain = next(r.peak_bytes for r in runs if r.kind == "plain")
    for r in runs:
        lines.append(f"{LABELS[r.kind]} | {r.peak_bytes / 2 ** 30:.2f} | {r.peak_bytes / plain:.3f}")
    return "\n".join(lines)


def rounds(order: tuple[str, ...], repeats: int) -> list[tuple[str, ...]]:
    """``repeats`` rounds of the workflows, every other round in reverse order: a linear drift of
    the machine's speed then costs every workflow alike."""
    return [order if i % 2 == 0 else tuple(reversed(order)) for i in range(repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=os.environ.get("BPS_TEST_SD15_CKPT"),
                        help="SD1.5 checkpoint (default $BPS_TEST_SD15_CKPT; train/random_checkpoint.py writes one)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=3, help="sampling steps per prompt (default 3)")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3, help="recorded prompts per workflow and mode (default 3)")
    parser.add_argument("--mode", choices=("both", "turn", "repeat"), default="both")
    parser.add_argument("--dtype", choices=DTYPE_FLAGS, default="fp32", help="UNet dtype (fp16/bf16: GPU only)")
    parser.add_argument("--no-residual-cache", action="store_true",
                        help="run the server with BPS_RESIDUAL_CACHE_MB=0: B_phi computed at every step")
    parser.add_argument("--memory", choices=("auto", "on", "off"), default="auto",
                        help="peak device memory per workflow after /free (auto: where the server runs on a GPU)")
    parser.add_argument("--keep", help="use this folder as the server's base directory and keep it")
    args = parser.parse_args()
    if not comfyui_available():
        sys.exit("bench_server needs the real ComfyUI: set COMFYUI_PATH to a ComfyUI checkout")
    if not args.ckpt or not Path(args.ckpt).is_file():
        sys.exit("give an SD1.5 checkpoint: --ckpt FILE or BPS_TEST_SD15_CKPT (python -c 'from "
                 "train.random_checkpoint import write_random_sd15_checkpoint' writes a random one)")
    from comfy_server import ComfyServer

    with tempfile.TemporaryDirectory(prefix="bps_bench_server_") as tmp:
        base = Path(args.keep or tmp)
        if not (base / "models" / "bps" / ADAPTER).is_file():
            write_model_files(base, args.size)
        env = {"BPS_RESIDUAL_CACHE_MB": "0"} if args.no_residual_cache else {}
        with ComfyServer(base, extra_args=DTYPE_FLAGS[args.dtype], env=env) as server:
            server.add_model("checkpoints", args.ckpt, "sd15.safetensors")
            server.start()
            stats = server.get_json("/system_stats")
            device = stats["devices"][0]
            print(f"# bench_server size={args.size} steps={args.steps} cfg={args.cfg} repeats={args.repeats} "
                  f"dtype={args.dtype} residual_cache={not args.no_residual_cache} comfyui={comfy_version()} "
                  f"({comfy_commit()}) torch={stats['system']['pytorch_version']} "
                  f"python={platform.python_version()} device={device['name']} cores={os.cpu_count()}",
                  flush=True)
            print("# command: COMFYUI_PATH=... python bench/bench_server.py " + " ".join(sys.argv[1:]), flush=True)
            seed = 1000
            for kind in WORKFLOWS:  # warm-up: every model loaded once
                seed += 1
                run_prompt(server, kind, seed, args)
            reports = []
            if args.mode in ("both", "turn"):
                print("# (a) the workflows in turn", flush=True)
                runs = []
                for order in rounds(WORKFLOWS, args.repeats):
                    for kind in order:
                        seed += 1
                        runs.append(run_prompt(server, kind, seed, args))
                reports.append(table(f"(a) the workflows in turn, {args.size}x{args.size}, {args.steps} steps", runs))
            if args.mode in ("both", "repeat"):
                print("# (b) each workflow repeated with new seeds", flush=True)
                runs = []
                per_block = max(1, (args.repeats + 1) // 2)
                for order in rounds(WORKFLOWS, 2):
                    for kind in order:
                        seed += 1
                        run_prompt(server, kind, seed, args)  # the switch to this workflow, not recorded
                        for _ in range(per_block):
                            seed += 1
                            runs.append(run_prompt(server, kind, seed, args))
                reports.append(table(f"(b) the same workflow re-run with a new seed, {args.size}x{args.size}, "
                                     f"{args.steps} steps", runs))
            if args.memory == "on" or (args.memory == "auto" and device["type"] == "cuda"):
                print("# (c) peak memory, each workflow after /free", flush=True)
                runs = []
                for kind in WORKFLOWS:
                    server.free_memory()
                    seed += 1
                    runs.append(run_prompt(server, kind, seed, args, memory=True))
                reports.append(memory_table(f"(c) peak device memory after /free, {args.size}x{args.size}, "
                                            f"{args.dtype}, {device['name']}", runs))
            print("\n\n".join(reports), flush=True)


if __name__ == "__main__":
    start = time.monotonic()
    main()
    print(f"# wall {time.monotonic() - start:.0f} s")
