"""Benchmark the path users run: ComfyUI's own server, API prompts, plain vs + BPS vs + ControlNet.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_server.py --ckpt sd15.safetensors [--size 256]
        [--steps 3] [--repeats 3] [--mode both|turn|repeat] [--dtype fp16] [--base sd15|sdxl]
        [--workflows plain bps ...]

Starts ComfyUI's ``main.py`` on a loopback port (tests/comfy_server.py) with this pack as a custom
node, the checkpoint (SD1.5, or SDXL with ``--base sdxl``), a full-size adapter for that base
written as a file (random non-zero weights, fp16, as a converted official adapter is) and
ComfyUI's ControlNet for that base built from its config, written as a file (bench/server_bases.py).
It then queues the API prompts a user would queue:

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

It also counts the server's "Requested to load" log lines per prompt (model (re)loads), and after
each phase prints the load average, the server's resident memory (now and peak) and the machine's
available memory. All figures are ratios measured in one run, so a busy machine slows all of them
alike. ``--dtype`` passes ComfyUI's ``--fp16-unet``/``--bf16-unet``: a GPU computes in that dtype;
the CPU stores the UNet's and the ControlNet's weights in it and computes fp32 (ComfyUI's manual
cast, layer by layer), which halves their RAM (what fits a full-size SDXL in 24 GB); on a GPU the
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
from bench.server_bases import BASES, ServerBase, write_adapter, write_controlnet  # noqa: E402

WORKFLOWS = ("plain", "bps", "bps_new_sketch", "controlnet")
LABELS = {"plain": "plain", "bps": "BPS", "bps_new_sketch": "BPS, new sketch", "controlnet": "ControlNet"}
DTYPE_FLAGS = {"fp32": [], "fp16": ["--fp16-unet"], "bf16": ["--bf16-unet"]}
IMAGE = "bench_sketch.png"


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


def prompt(kind: str, seed: int, size: int, steps: int, cfg: float, base: ServerBase = BASES["sd15"]) -> dict:
    """The API prompt of one workflow. The graph is the same for every base: CLIPTextEncode on an
    SDXL checkpoint's CLIP gives both text encoders and the pooled output, and ComfyUI adds the
    size conditioning (the latent's size) itself."""
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base.checkpoint_name}},
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
        p["6"] = {"class_type": "BPSLoader", "inputs": {"adapter_name": base.adapter_name}}
        p["9"] = {"class_type": "BPSApply", "inputs": {"model": ["1", 0], "bps_adapter": ["6", 0], "image": ["5", 0],
                                                       "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        p["7"]["inputs"]["model"] = ["9", 0]
    elif kind == "controlnet":
        p["6"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": base.controlnet_name}}
        p["9"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["6", 0], "image": ["5", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        p["7"]["inputs"]["positive"], p["7"]["inputs"]["negative"] = ["9", 0], ["9", 1]
    return p


def write_model_files(folder: Path, size: int, base: ServerBase) -> None:
    """The adapter, the ControlNet and the sketch, as files a user would have (those not there yet)."""
    for sub in ("models/bps", "models/controlnet", "input"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    if not (folder / "input" / IMAGE).is_file():
        write_sketch(folder / "input" / IMAGE, size, seed=0)
    adapter = folder / "models" / "bps" / base.adapter_name
    control = folder / "models" / "controlnet" / base.controlnet_name
    if adapter.is_file() and control.is_file():
        return  # a --keep folder of an earlier run: no need to boot ComfyUI in this process
    import comfy_host
    from bench.comfy_unet import boot_comfyui

    pack = boot_comfyui()
    if not adapter.is_file():
        write_adapter(pack, base, adapter)
    if not control.is_file():
        write_controlnet(pack, base, control)
    comfy_host.release_memory()
    gc.collect()


def machine_line(server) -> str:
    """Load average, the server's resident memory (now and peak: VmRSS, VmHWM) and the machine's
    available memory, so a results file shows what else ran and that the server fitted in RAM."""
    parts = ["load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())]
    try:
        status = Path(f"/proc/{server.process.pid}/status").read_text().splitlines()
        kib = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}
        parts.append(f"server RSS {kib['VmRSS'] / 2 ** 20:.1f} GiB (peak {kib['VmHWM'] / 2 ** 20:.1f} GiB)")
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        available = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable"))
        parts.append(f"machine MemAvailable {available / 2 ** 20:.1f} GiB")
    except (OSError, AttributeError, KeyError, StopIteration, ValueError):
        pass  # not Linux: the load average alone
    return "# " + "; ".join(parts)


class Run:
    """One prompt's figures: ``steps`` are the sampler's steps after the first; ``first`` is from
    the sampler node's start to its first step's end (model loading and the first step), and
    ``outside`` the rest of the prompt outside the sampler's steps (queueing, the other nodes,
    saving), so ``seconds == outside + first + sum(steps)``."""

    def __init__(self, kind: str, seconds: float, steps: list[float], loads: int, peak_bytes: int | None = None,
                 first: float | None = None):
        self.kind, self.seconds, self.steps, self.loads, self.peak_bytes = kind, seconds, steps, loads, peak_bytes
        self.first = first
        self.outside = seconds - sum(steps) - first if first is not None else None


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
        result = server.run(prompt(kind, seed, args.size, args.steps, args.cfg, BASES[args.base]), timeout=1800)
    with open(server.log_path, "rb") as f:
        f.seek(log_before)
        loads = f.read().decode(errors="replace").count("Requested to load")
    intervals = result.step_seconds("7")
    steps = intervals[1:]  # the first interval includes model loading
    run = Run(kind, result.seconds, steps, loads, poller.peak if memory else None,
              first=intervals[0] if intervals else None)
    peak = f", peak {run.peak_bytes / 2 ** 30:.2f} GiB" if memory else ""
    phases = f", first step {run.first:.2f} s, outside the sampler {run.outside:.2f} s" if intervals else ""
    print(f"#   {kind:14s} seed {seed}: {run.seconds:7.2f} s/prompt, steps {[round(s, 2) for s in steps]}"
          f"{phases}, model loads {loads}{peak}", flush=True)
    return run


def table(title: str, runs: list[Run]) -> str:
    """Medians per workflow, each as a ratio to plain's, as a Markdown-ish table."""
    # The workflows that ran, in the usual order (--workflows may leave some out; plain is needed).
    per = {k: v for k in WORKFLOWS if (v := [r for r in runs if r.kind == k])}
    med_prompt = {k: statistics.median(r.seconds for r in v) for k, v in per.items()}
    med_step = {k: statistics.median(s for r in v for s in r.steps) for k, v in per.items()}
    lines = [f"## {title}", "workflow | prompts | s/prompt (median) | x plain | steps | s/step (median) | x plain | "
                            "model loads/prompt | first step s (median) | outside the sampler s (median)"]
    for k in per:
        loads = statistics.mean(r.loads for r in per[k])
        n_steps = sum(len(r.steps) for r in per[k])
        firsts = [r.first for r in per[k] if r.first is not None]
        outside = [r.outside for r in per[k] if r.outside is not None]
        phases = " | ".join(f"{statistics.median(v):.2f}" if v else "-" for v in (firsts, outside))
        lines.append(f"{LABELS[k]} | {len(per[k])} | {med_prompt[k]:.2f} | {med_prompt[k] / med_prompt['plain']:.3f} | "
                     f"{n_steps} | {med_step[k]:.3f} | {med_step[k] / med_step['plain']:.3f} | {loads:.1f} | {phases}")
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
    parser.add_argument("--base", choices=BASES, default="sd15",
                        help="the checkpoint's base model, which picks the adapter and ControlNet written (default sd15)")
    parser.add_argument("--ckpt", help="the base's checkpoint (sd15 default: $BPS_TEST_SD15_CKPT; "
                                       "train/random_checkpoint.py writes random ones)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=3, help="sampling steps per prompt (default 3)")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3, help="recorded prompts per workflow and mode (default 3)")
    parser.add_argument("--mode", choices=("both", "turn", "repeat"), default="both")
    parser.add_argument("--dtype", choices=DTYPE_FLAGS, default="fp32",
                        help="UNet and ControlNet weight dtype (default fp32); on the CPU fp16/bf16 store the "
                             "weights so and compute fp32, which halves their RAM (--base sdxl in 24 GB)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                        help="one more flag for ComfyUI's main.py, repeatable (e.g. --server-arg=--fp8_e4m3fn-text-enc "
                             "stores the text encoders in 8 bits: they run once, their outputs are cached)")
    parser.add_argument("--no-residual-cache", action="store_true",
                        help="run the server with BPS_RESIDUAL_CACHE_MB=0: B_phi computed at every step")
    parser.add_argument("--memory", choices=("auto", "on", "off"), default="auto",
                        help="peak device memory per workflow after /free (auto: where the server runs on a GPU)")
    parser.add_argument("--keep", help="use this folder as the server's base directory and keep it")
    parser.add_argument("--workflows", nargs="+", choices=WORKFLOWS, default=list(WORKFLOWS),
                        help="the workflows to run (default: all four; plain is always run, every ratio is to it)")
    args = parser.parse_args()
    workflows = tuple(k for k in WORKFLOWS if k in args.workflows or k == "plain")
    base = BASES[args.base]
    args.ckpt = args.ckpt or (os.environ.get(base.ckpt_env) if base.ckpt_env else None)
    if not comfyui_available():
        sys.exit("bench_server needs the real ComfyUI: set COMFYUI_PATH to a ComfyUI checkout")
    if not args.ckpt or not Path(args.ckpt).is_file():
        default = f" or {base.ckpt_env}" if base.ckpt_env else ""
        sys.exit(f"give an {base.label} checkpoint: --ckpt FILE{default} (train.random_checkpoint."
                 f"{base.ckpt_writer} writes a random one)")
    from comfy_server import ComfyServer

    with tempfile.TemporaryDirectory(prefix="bps_bench_server_") as tmp:
        folder = Path(args.keep or tmp)
        write_model_files(folder, args.size, base)
        env = {"BPS_RESIDUAL_CACHE_MB": "0"} if args.no_residual_cache else {}
        with ComfyServer(folder, extra_args=DTYPE_FLAGS[args.dtype] + args.server_arg, env=env) as server:
            server.add_model("checkpoints", args.ckpt, base.checkpoint_name)
            server.start()
            stats = server.get_json("/system_stats")
            device = stats["devices"][0]
            print(f"# bench_server base={args.base} size={args.size} steps={args.steps} cfg={args.cfg} "
                  f"repeats={args.repeats} "
                  f"dtype={args.dtype} residual_cache={not args.no_residual_cache} comfyui={comfy_version()} "
                  f"({comfy_commit()}) torch={stats['system']['pytorch_version']} "
                  f"python={platform.python_version()} device={device['name']} cores={os.cpu_count()}",
                  flush=True)
            print("# command: COMFYUI_PATH=... python bench/bench_server.py " + " ".join(sys.argv[1:]), flush=True)
            bps_env = " ".join(f"{k}={v}" for k, v in sorted({**os.environ, **env}.items()) if k.startswith("BPS_"))
            print(f"# server: {bps_env} main.py --cpu {' '.join(server.extra_args)}", flush=True)
            seed = 1000
            # Warm-up, every model loaded once, for the turn mode; the repeat mode's unrecorded
            # switching prompts load each workflow's models before its recorded prompts anyway.
            warm_up = workflows if args.mode != "repeat" else ()
            for kind in warm_up:
                seed += 1
                run_prompt(server, kind, seed, args)
            print(machine_line(server), flush=True)
            reports = []
            if args.mode in ("both", "turn"):
                print("# (a) the workflows in turn", flush=True)
                runs = []
                for order in rounds(workflows, args.repeats):
                    for kind in order:
                        seed += 1
                        runs.append(run_prompt(server, kind, seed, args))
                print(machine_line(server), flush=True)
                reports.append(table(f"(a) the workflows in turn, {args.size}x{args.size}, {args.steps} steps", runs))
            if args.mode in ("both", "repeat"):
                print("# (b) each workflow repeated with new seeds", flush=True)
                runs = []
                per_block = max(1, (args.repeats + 1) // 2)
                for order in rounds(workflows, 2):
                    for kind in order:
                        seed += 1
                        run_prompt(server, kind, seed, args)  # the switch to this workflow, not recorded
                        for _ in range(per_block):
                            seed += 1
                            runs.append(run_prompt(server, kind, seed, args))
                print(machine_line(server), flush=True)
                reports.append(table(f"(b) the same workflow re-run with a new seed, {args.size}x{args.size}, "
                                     f"{args.steps} steps", runs))
            if args.memory == "on" or (args.memory == "auto" and device["type"] == "cuda"):
                print("# (c) peak memory, each workflow after /free", flush=True)
                runs = []
                for kind in workflows:
                    server.free_memory()
                    seed += 1
                    runs.append(run_prompt(server, kind, seed, args, memory=True))
                print(machine_line(server), flush=True)
                reports.append(memory_table(f"(c) peak device memory after /free, {args.size}x{args.size}, "
                                            f"{args.dtype}, {device['name']}", runs))
            print("\n\n".join(reports), flush=True)


if __name__ == "__main__":
    start = time.monotonic()
    main()
    print(f"# wall {time.monotonic() - start:.0f} s")
