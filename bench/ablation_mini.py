"""The paper's ablations at mini scale, side by side in one run, on CPU (issue 16, part 8).

    COMFYUI_PATH=/path/to/ComfyUI python bench/ablation_mini.py [--steps 150] [--conditions 16]
        [--seeds 2] [--diversity-seeds 4] [--work DIR] [--threads 2]

On the mini base (``train/mini_base``: a small SD1.5 trained in the repo, cached), every adapter
is trained by the real trainer command line (``train/train_bps.py``, in process) on sketch ->
shape pairs, with the same recipe except what an ablation changes, and evaluated on the same
held-out sketches (never trained on) with the same noise:

1. **integration modes**: where the residuals go. The trainer's presets E, M, D, EM, MD (the
   named groups at the pack's default weights, the others 0), ``uniform`` (encoder, middle and
   decoder all at 1: the paper's EMD) and ``paper`` (the top-heavy weights 16/8/4/2 and middle 16,
   decoder 1: the paper's BPS). The paper's segmentation mIoU: BPS 0.366, EMD 0.351, EM 0.350,
   MD 0.240;
2. **strength against diversity**: the ``uniform`` adapter sampled at Apply BPS strengths 0 (the
   base alone) to 1.5, ``--diversity-seeds`` seeds per held-out sketch: IoU with the sketch's region
   and the mean pairwise distance between the seeds' pictures of one sketch (RMS over pixels, in
   [0, 1]). The paper: lowering the weights increases diversity;
3. **data scarcity**: the ``uniform`` recipe on 40 and on 320 training pairs, same steps.

Scores: IoU of the generated shape with the sketch's region (``train/mini_base/fidelity.py``),
beside the ceiling (targets through the stand-in VAE and back); eps-MSE with own and swapped
sketches on the held-out pairs (``train/condition_gap.py``, the base's errors measured once).
Samples: ComfyUI's KSampler code, euler, 20 steps, CFG 1 (the stand-in text encoder gives one
context), on models steered by Apply BPS's attach code.

Learning rates: the mini base's recipe trains at lr 1e-3 with unit weights; with the top-heavy
weights a residual moves 16 times as far per step and the run diverges there (the prototype in
issue 16), so every preset that carries a weight of 16 (E, M, EM, MD, paper) trains at lr 1e-4 and
the unit-weight ones (D, uniform) at 1e-3: about the same step in residual space.

Prints the tables and writes bench/results/ablation_mini.json and .md. CPU timings on a shared
machine are indicative only; every number in the tables comes from this one run.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from bench.comfy_unet import comfy_host  # noqa: E402  the tests' loader of train/train_bps.py

#: (label, --omega preset, lr): the integration modes, paper's names first.
MODES = (("E", "E", 1e-4), ("M", "M", 1e-4), ("D", "D", 1e-3), ("EM", "EM", 1e-4), ("MD", "MD", 1e-4),
         ("EMD (uniform)", "uniform", 1e-3), ("top-heavy (paper)", "paper", 1e-4))
#: The paper's segmentation-to-image mIoU (ADE20K) per mode, where it reports one.
PAPER_MIOU = {"EM": 0.350, "MD": 0.240, "EMD (uniform)": 0.351, "top-heavy (paper)": 0.366}
STRENGTHS = (0.0, 0.25, 0.5, 1.0, 1.5)
PAIR_COUNTS = (40, 320)


def _train(entry, base_path: Path, pairs: Path, out: Path, preset: str, lr: float, steps: int,
           extra: tuple[str, ...] = ()) -> float:
    argv = [*extra, "--ckpt", str(base_path), "--data", str(pairs), "--out", str(out), "--overwrite",
            "--resolution", "128", "--batch-size", "8", "--grad-accum", "1", "--lr", str(lr), "--omega", preset,
            "--steps", str(steps), "--num-workers", "0", "--save-every", "0", "--seed", "0", "--no-progress",
            "--cache-dir", str(out.parent / "cache")]
    t0 = time.perf_counter()
    code = entry.main(argv)
    if code:
        raise SystemExit(f"training {out.name} failed with exit code {code}")
    return time.perf_counter() - t0


def _pairwise_distance(pictures: np.ndarray) -> float:
    """Mean RMS distance between every two of ``pictures`` (seeds, S, S, 3) in [0, 1]."""
    d = [float(np.sqrt(((a - b) ** 2).mean())) for a, b in itertools.combinations(pictures, 2)]
    return float(np.mean(d))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per adapter (batch 8). Default: 150.")
    p.add_argument("--conditions", type=int, default=16, help="held-out sketches. Default: 16.")
    p.add_argument("--seeds", type=int, default=2, help="samples per sketch for IoU. Default: 2.")
    p.add_argument("--diversity-seeds", type=int, default=4, help="samples per sketch for diversity. Default: 4.")
    p.add_argument("--eval-seed", type=int, default=0, help="which held-out sketches and noise. Default: 0.")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one).")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads. Default: torch's choice.")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone.")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    entry = comfy_host.trainer_entry()
    entry.boot_comfyui(entry.find_comfyui())
    pack = entry.import_pack()
    mod = lambda name: importlib.import_module(f"{pack.__name__}.{name}")  # noqa: E731
    build, shapes, evaluate = mod("train.mini_base.build"), mod("train.mini_base.shapes"), mod("train.mini_base.evaluate")
    model_file, stand_ins, fidelity = mod("train.mini_base.model_file"), mod("train.mini_base.stand_ins"), \
        mod("train.mini_base.fidelity")
    gap_mod, bps, steering = mod("train.condition_gap"), mod("bps"), mod("nodes.steering")
    work = Path(args.work or tempfile.mkdtemp(prefix="bps_ablation_"))
    work.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    base_path = build.ensure_mini_base()
    times["mini base (build or reuse)"] = time.perf_counter() - t0
    pair_dirs = {n: shapes.write_pair_folder(work / f"pairs_{n}", shapes.random_layouts(evaluate.TRAIN_LAYOUT_SEED, n))
                 for n in PAIR_COUNTS}

    # ---- train every adapter first (the trainer loads the base itself)
    runs = [(label, preset, lr, 40) for label, preset, lr in MODES] + [("EMD (uniform), 320 pairs", "uniform", 1e-3, 320)]
    adapters: dict[str, Path] = {}
    for label, preset, lr, n in runs:
        out = work / f"adapter_{preset}_{n}.safetensors"
        print(f"training {label}: --omega {preset} --lr {lr:g}, {n} pairs, {args.steps} steps", flush=True)
        # The main recipe's run also logs the trainer's own-vs-swapped validation gap (loss.csv, loss.png).
        extra = ("--validate-every", str(max(1, args.steps // 5)), "--validation-count", "2") \
            if (preset, n) == ("uniform", 40) else ()
        times[f"train {label}"] = _train(entry, base_path, pair_dirs[n], out, preset, lr, args.steps, extra)
        adapters[label] = out
        if extra and not args.no_write:
            run_dir = out.with_name(out.stem + "_checkpoints")
            RESULTS.mkdir(parents=True, exist_ok=True)
            for name in ("loss.csv", "loss.png"):
                (RESULTS / f"ablation_mini_uniform40_{name}").write_bytes((run_dir / name).read_bytes())

    # ---- one held-out set, one base measurement, then every adapter on it
    model, _ = model_file.load_mini_base(base_path)
    scale = float(model.model.latent_format.scale_factor)
    held = evaluate.HeldOut.draw(args.eval_seed, args.conditions, shapes.SIZE, scale)
    context = stand_ins.StandInTextEncoder(model.model.model_config.unet_config["context_dim"]).encode("")
    ms = model.get_model_object("model_sampling")
    plan = gap_mod.GapPlan(per_band=1, seed=args.eval_seed)
    ceiling = evaluate.ceiling(held)
    seeds = [args.eval_seed * 1000 + k for k in range(max(args.seeds, args.diversity_seeds))]

    def pictures(m) -> np.ndarray:  # (conditions, seeds, S, S, 3)
        return np.stack([evaluate.sample_pictures(m, s, args.conditions, shapes.SIZE // 8, context) for s in seeds],
                        axis=1)

    def iou(pics: np.ndarray, k: int) -> dict:
        f = fidelity.Fidelity.of([shapes.shape_mask(pics[i, j]) for i in range(args.conditions) for j in range(k)],
                                 [held.regions[i] for i in range(args.conditions) for _ in range(k)])
        return f.to_dict()

    def diversity(pics: np.ndarray) -> float:
        return float(np.mean([_pairwise_distance(pics[i, :args.diversity_seeds]) for i in range(args.conditions)]))

    t0 = time.perf_counter()
    base_pics = pictures(model)
    base_errors = gap_mod.base_errors(gap_mod.comfy_base_forward(model), held.latents, context, ms, plan,
                                      batch_size=32)
    times["evaluate base"] = time.perf_counter() - t0
    results: dict = {"base": {"iou": iou(base_pics, args.seeds), "diversity": diversity(base_pics),
                              "eps_mse": float(base_errors.mean())},
                     "ceiling_iou": ceiling.iou, "adapters": {}, "strength": {}}

    for label, path in adapters.items():
        t0 = time.perf_counter()
        adapter = bps.load_adapter(path)
        steered = steering.attach_bps(model, adapter, held.sketches, bps.make_schedule(list(adapter.omega),
                                                                                      ports=adapter.ports), cache=None)
        pics = pictures(steered)
        fwd, _ = gap_mod.comfy_forwards(model, adapter.network, list(adapter.omega), adapter.unet_shape)
        gap = gap_mod.measure_condition_gap(fwd, base_errors, held.latents, held.sketches, context, ms, plan=plan,
                                            batch_size=32)
        o = gap.overall
        results["adapters"][label] = {
            "preset": path.stem.split("_")[1], "iou": iou(pics, args.seeds), "diversity": diversity(pics),
            "eps_own": o.own.mean, "eps_swapped": o.swapped.mean, "gap": o.gap.mean, "gap_ci95": o.gap.ci95,
            "uses_condition": gap.uses_condition}
        if label == "EMD (uniform)":  # strength against diversity on the main recipe's adapter
            for s in STRENGTHS:
                m = steering.attach_bps(model, adapter, held.sketches, bps.make_schedule(
                    list(adapter.omega), strength=s, ports=adapter.ports), cache=None) if s else model
                spics = pics if s == 1.0 else base_pics if s == 0 else pictures(m)
                results["strength"][f"{s:g}"] = {"iou": iou(spics, args.seeds)["iou"], "diversity": diversity(spics)}
        times[f"evaluate {label}"] = time.perf_counter() - t0
        print(f"{label}: IoU {results['adapters'][label]['iou']['iou']:.3f}, eps own {o.own.mean:.4f} swapped "
              f"{o.swapped.mean:.4f}", flush=True)

    results["settings"] = {"steps": args.steps, "batch_size": 8, "resolution": 128, "conditions": args.conditions,
                           "iou_seeds": args.seeds, "diversity_seeds": args.diversity_seeds,
                           "eval_seed": args.eval_seed, "gap_timesteps": list(plan.timesteps),
                           "mini_base": base_path.name, "sampler": "euler, 20 steps, cfg 1 (KSampler code)"}
    results["machine"] = {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                          "note": "2 CPU cores shared with other jobs: timings indicative only"}
    results["seconds"] = {k: round(v, 1) for k, v in times.items()}
    results["total_minutes"] = round((time.perf_counter() - t_run) / 60, 1)
    text = report(results)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "ablation_mini.json").write_text(json.dumps(results, indent=1) + "\n")
        (RESULTS / "ablation_mini.md").write_text(text)
    return 0


def report(r: dict) -> str:
    """The three tables as markdown."""
    s = r["settings"]
    lines = [f"Mini base `{s['mini_base']}`; adapters: real trainer, {s['steps']} steps x batch {s['batch_size']} at "
             f"{s['resolution']} px; {s['conditions']} held-out sketches x {s['iou_seeds']} seeds, {s['sampler']}; "
             f"eps-MSE at timesteps {s['gap_timesteps']}. IoU ceiling (target through the stand-in VAE): "
             f"{r['ceiling_iou']:.3f}.", "",
             "Integration modes (40 training pairs):", "",
             "| mode | IoU with the sketch's region | eps-MSE own / swapped (gap ± 95% CI) | paper mIoU (ADE20K) |",
             "| --- | --- | --- | --- |",
             f"| base alone | {r['base']['iou']['iou']:.3f} ± {r['base']['iou']['iou_std']:.3f} | "
             f"{r['base']['eps_mse']:.4f} | |"]
    for label, a in r["adapters"].items():
        if "320" in label:
            continue
        paper = PAPER_MIOU.get(label)
        lines.append(f"| {label} | {a['iou']['iou']:.3f} ± {a['iou']['iou_std']:.3f} | {a['eps_own']:.4f} / "
                     f"{a['eps_swapped']:.4f} ({a['gap']:+.4f} ± {a['gap_ci95']:.4f}) | "
                     f"{'' if paper is None else f'{paper:.3f}'} |")
    lines += ["", f"Strength against diversity (EMD (uniform) adapter; {s['diversity_seeds']} seeds per sketch, mean "
              f"pairwise RMS distance):", "", "| strength | IoU | diversity |", "| --- | --- | --- |"]
    for k, v in r["strength"].items():
        lines.append(f"| {k} | {v['iou']:.3f} | {v['diversity']:.4f} |")
    lines += ["", "Training pairs (EMD (uniform) recipe, same steps):", "",
              "| pairs | IoU | eps-MSE own / swapped |", "| --- | --- | --- |"]
    for label, n in (("EMD (uniform)", 40), ("EMD (uniform), 320 pairs", 320)):
        a = r["adapters"][label]
        lines.append(f"| {n} | {a['iou']['iou']:.3f} ± {a['iou']['iou_std']:.3f} | {a['eps_own']:.4f} / "
                     f"{a['eps_swapped']:.4f} |")
    lines += ["", f"Run time {r['total_minutes']} min on {r['machine']['torch_threads']} torch threads "
              f"({r['machine']['note']})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
