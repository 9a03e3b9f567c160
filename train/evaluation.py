"""The evaluation run of ``train/evaluate_bps.py``: gap table, samples, agreement scores, grid.

``run(args)`` checks the cheap things first (adapter file, held-out folder, every image), then
loads the base with ComfyUI's loader (the trainer's :mod:`train.base_model`), refuses an adapter
the Apply BPS code refuses for this base, encodes the pairs into the trainer's cache format and:

1. measures the own- vs swapped-condition eps-MSE per timestep band (:mod:`train.condition_gap`,
   the steered forward of ``nodes.steering``);
2. samples the first ``--samples`` pairs with ComfyUI's sampler (``comfy.sample.sample``, what the
   KSampler node runs), for the base alone and for the model steered by ``attach_bps`` (what the
   Apply BPS node runs), ``--seeds`` seeds each;
3. scores the samples against their condition (:mod:`train.condition_agreement`) and, as chance
   level, against another pair's condition;
4. writes ``report.md``, ``report.json`` and ``grid.png`` (condition | target | base | steered).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..bps import Adapter, AdapterError, load_adapter, make_schedule
from ..bps.condition_maps import ConditionSpec
from .base_model import BaseModels, checkpoint_unet_dtype, load_base_models, unet_weight_dtype
from .cache import CacheConfig, TrainingCache, checkpoint_identity, hint_values, prepare_pair, sample_keys
from .comparison_grid import save_comparison_grid
from .condition_agreement import default_tolerance, edge_agreement, region_agreement
from .condition_gap import ConditionGap, GapPlan, comfy_forwards, measure_condition_gap
from .dataset import DataError, Pair, load_pairs
from .hint_layout import HintLayout
from .images import image_size, training_size

log = logging.getLogger("bps.eval")

#: Hint meanings scored by edge agreement (sketches, edge and line maps).
EDGE_MEANINGS = ("sketch", "edge", "edges", "canny", "lineart", "line", "pidinet", "hed", "scribble", "contour")
#: Hint meanings scored by region agreement.
REGION_MEANINGS = ("layout", "segmentation", "seg", "image", "color", "colour", "mask", "regions")


class EvalError(RuntimeError):
    """The evaluation cannot run; the message says why and what to do."""


@dataclass
class EvalResult:
    """What an evaluation measured and wrote."""

    gap: ConditionGap
    score_kind: str                       # "edges", "regions" or "none"
    scores: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)


# ----------------------------------------------------------------------------- preflight

def _load_adapter(path: Path) -> Adapter:
    if not path.is_file():
        raise EvalError(f"adapter {path} does not exist; pass the .safetensors file the trainer wrote "
                        f"(train/train_bps.py --out) with --adapter")
    try:
        return load_adapter(path)
    except AdapterError as e:
        raise EvalError(str(e)) from e


def hint_layout_of_adapter(adapter: Adapter) -> HintLayout:
    """The condition files an adapter takes, as the trainer reads them (channels, extra map)."""
    cfg = adapter.config
    try:
        return HintLayout(cfg.hint_channels, cfg.extra_channels > 0)
    except ValueError as e:
        raise EvalError(f"adapter {adapter.path}: its condition ({cfg.hint_channels} channels, "
                        f"{cfg.extra_channels} extra) is not one the trainer's data layouts hold: {e}") from e


def condition_from_targets(args, adapter: Adapter) -> ConditionSpec | None:
    """The adapter's recorded preprocessor when the held-out folder has no ``source/`` (the trainer's
    --condition: conditions made from the target images, as training made them); else None."""
    if adapter.condition is None or (Path(args.data) / "source").is_dir():
        return None
    try:
        return ConditionSpec.from_dict(adapter.condition)
    except ValueError as e:
        raise EvalError(f"adapter {adapter.path} records a condition preprocessor this version cannot run "
                        f"({e}); give the held-out folder a source/ with the condition images") from e


def _held_out_pairs(args, hint: HintLayout, condition: ConditionSpec | None) -> list[Pair]:
    data = Path(args.data)
    if not data.is_dir():
        raise EvalError(f"held-out folder {data} does not exist; pass --data DIR with source/ and target/ "
                        f"(the trainer's layouts, see train/train_bps.py --help), holding pairs the adapter "
                        f"never saw in training")
    try:
        pairs, skipped = load_pairs(data, prompt=args.prompt, skip_bad=args.skip_bad, workers=2, hint=hint,
                                    from_targets=condition.kind if condition else None)
    except DataError as e:
        text = str(e).replace("training data", "held-out data").replace("to train on", "to evaluate on")
        raise EvalError(text) from e
    for problem in skipped:
        log.warning("skipping %s (--skip-bad)", problem)
    pairs = sorted(pairs, key=lambda p: p.name)[:args.max_pairs]
    if len(pairs) < 2:
        raise EvalError(f"{data} holds {len(pairs)} usable pair(s); comparing each pair's own condition with "
                        f"a swapped one needs at least 2 (50 or more give a tight confidence interval)")
    return pairs


def _resolution(args, adapter: Adapter) -> int:
    if args.resolution:
        return args.resolution
    trained = str((adapter.metadata.get("provenance") or {}).get("resolution", ""))
    try:
        w, h = (int(v) for v in trained.split("x"))
        return int(round(math.sqrt(w * h) / 64)) * 64 or 512
    except ValueError:
        return 512


def score_kind(args, adapter: Adapter) -> str:
    """The agreement score for this adapter: --score, or by hint meaning and channels."""
    if args.score != "auto":
        return args.score
    meaning = (adapter.hint_meaning or "").lower()
    cfg = adapter.config
    if cfg.extra_channels or cfg.downscale == 1 or meaning.startswith("style"):
        return "none"  # a style reference is not drawn in the image's layout
    if any(meaning.startswith(m) for m in EDGE_MEANINGS):
        return "edges"
    if any(meaning.startswith(m) for m in REGION_MEANINGS):
        return "regions"
    return "edges" if cfg.hint_channels == 1 else "regions"


def _check_fits(base: BaseModels, adapter: Adapter, ckpt: str) -> None:
    """Refuse an adapter that Apply BPS refuses for this base (its message names both)."""
    from ..nodes.steering import attach_bps
    hint = torch.zeros((1, adapter.config.hint_channels + adapter.config.extra_channels, 64, 64))
    try:
        attach_bps(base.model, adapter, hint, make_schedule(adapter.omega, ports=adapter.ports), cache=None)
    except (ValueError, AdapterError) as e:
        raise EvalError(f"adapter {Path(adapter.path or '?').name} does not fit the base {Path(ckpt).name}: {e}") \
            from e


# ----------------------------------------------------------------------------- the run

def _bar(args, total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True, disable=args.no_progress)


def run(args, *, base: BaseModels | None = None) -> EvalResult:
    """Evaluate as the command line says (:func:`train.eval_cli.parse_args`).

    Args:
        args: parsed command line.
        base: already loaded base models (tests reuse one load); loaded from ``args.ckpt`` if None.

    Raises:
        EvalError, BaseModelError: with the problem and the fix in the message.
    """
    import comfy.model_management

    adapter = _load_adapter(Path(args.adapter))
    hint = hint_layout_of_adapter(adapter)
    condition = condition_from_targets(args, adapter)
    if condition is not None:
        log.info("no source/ in %s: conditions made from the targets with the adapter's preprocessor, %s",
                 args.data, condition.describe())
    pairs = _held_out_pairs(args, hint, condition)
    size = training_size(*image_size(pairs[0].target), _resolution(args, adapter))
    kind = score_kind(args, adapter)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("%d held-out pairs from %s at %dx%d px; adapter %s (%s, %d channel(s))", len(pairs), args.data,
             size[1], size[0], Path(args.adapter).name, adapter.hint_meaning, adapter.config.hint_channels)

    device = comfy.model_management.get_torch_device()
    if base is None:
        base = load_base_models(args.ckpt, unet_dtype=unet_weight_dtype("no", device, checkpoint_unet_dtype(args.ckpt)))
    _check_fits(base, adapter, args.ckpt)

    # ---- encode (the trainer's cache: reruns and the trainer's own cache entries are reused)
    cache = TrainingCache(Path(args.cache_dir) if args.cache_dir else out / "cache",
                          CacheConfig(size=size, hint_channels=hint.channels, base_identity=checkpoint_identity(args.ckpt),
                                      encoder_tag=str(getattr(base.vae, "vae_dtype", "")), extra_map=hint.extra_map,
                                      condition=condition))
    keys = sample_keys(pairs, cache.config, workers=2)
    with _bar(args, len(pairs), "encoding held-out pairs") as bar:
        cache.encode_samples(pairs, keys, base.encode_images, progress=bar.update, workers=2)
    cache.encode_prompts(["", *(p.prompts[0] for p in pairs)], base.encode_text)
    samples = [cache.load_sample(k) for k in keys]
    latents = torch.stack([latent for latent, _ in samples]).float()
    hints = hint_values(torch.stack([h for _, h in samples]))
    contexts = [cache.load_text(p.prompts[0]) for p in pairs]

    # ---- 1. the condition gap
    network = adapter.network.to(device)
    steered, base_eps = comfy_forwards(base.model, network, adapter.omega, adapter.unet_shape)
    plan = GapPlan(per_band=args.per_band, seed=args.seed)
    with _bar(args, 3 * len(pairs) * len(plan.timesteps), "eps-MSE base / own / swapped") as bar:
        gap = measure_condition_gap(steered, base_eps, latents, hints, contexts, base.model_sampling, plan=plan,
                                    batch_size=args.batch_size, progress=bar.update)
    result = EvalResult(gap=gap, score_kind=kind, out=out)
    log.info("condition gap:\n%s\n%s", gap.table(), gap.verdict())

    # ---- 2.-3. samples and agreement scores
    shown = min(args.samples, len(pairs))
    if shown:
        images = _sample(args, base, adapter, hints[:shown], contexts[:shown], cache.load_text(""))
        conditions = [_picture(h) for h in hints]
        targets = [prepare_pair(p, size, hint, condition)[0] for p in pairs[:shown]]
        result.scores = _score(kind, images, conditions, gap.swap, args)
        seeds = [args.seed + s for s in range(args.seeds)]
        result.files["grid"] = save_comparison_grid(
            out / "grid.png", conditions[:shown], targets,
            {f"base s{s}": [images["base"][i][k] for i in range(shown)] for k, s in enumerate(seeds)} |
            {f"steered s{s}": [images["steered"][i][k] for i in range(shown)] for k, s in enumerate(seeds)})
    _write_report(result, args, adapter, pairs, size)
    return result


def _picture(hint: torch.Tensor) -> np.ndarray:
    """A hint (C, H, W) in [0, 1] as a uint8 picture: grey for 1 channel, RGB for 3 (an extra map and
    a latent map's other channels left out)."""
    c = hint.shape[0]
    arr = hint[:1] if c == 1 else hint[:3] if c in (3, 4) else hint.mean(dim=0, keepdim=True)
    arr = (arr.float().clamp(0, 1).movedim(0, -1).cpu().numpy() * 255).round().astype(np.uint8)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def _sample(args, base: BaseModels, adapter: Adapter, hints: torch.Tensor, contexts: list[torch.Tensor],
            negative: torch.Tensor) -> dict[str, list[list[np.ndarray]]]:
    """``{"base": [[image per seed] per pair], "steered": ...}`` through KSampler's code path."""
    import comfy.sample

    from ..nodes.steering import attach_bps

    schedule = make_schedule(adapter.omega, strength=args.strength, ports=adapter.ports)
    h, w = hints.shape[-2] // 8, hints.shape[-1] // 8
    latent = torch.zeros((1, 4, h, w))
    images: dict[str, list[list[np.ndarray]]] = {"base": [], "steered": []}
    total = hints.shape[0] * args.seeds * 2
    with _bar(args, total, "sampling base / steered") as bar, torch.no_grad():
        for i in range(hints.shape[0]):
            steered = attach_bps(base.model, adapter, hints[i:i + 1], schedule, cache=None)
            for name, model in (("base", base.model), ("steered", steered)):
                row = []
                for k in range(args.seeds):
                    seed = args.seed + k
                    noise = comfy.sample.prepare_noise(latent, seed)
                    out = comfy.sample.sample(model, noise, args.steps, args.cfg, args.sampler, args.scheduler,
                                              [[contexts[i], {}]], [[negative, {}]], latent, disable_pbar=True,
                                              seed=seed)
                    pixels = base.vae.decode(out)
                    row.append((pixels[0].float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
                    bar.update(1)
                images[name].append(row)
    return images


def _summary(values: list[float]) -> dict[str, float]:
    finite = np.array([v for v in values if math.isfinite(v)], np.float64)
    if finite.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
            "n": int(finite.size)}


def _score(kind: str, images: dict, conditions: list[np.ndarray], swap: list[int], args) -> dict[str, Any]:
    """Agreement of each sample with its own condition, and of the steered ones with a swapped one."""
    if kind == "none":
        return {}
    shown = len(images["steered"])
    rows: dict[str, list] = {"base, own condition": [], "steered, own condition": [],
                             "steered, swapped condition (chance)": []}
    for i in range(shown):
        for k in range(len(images["steered"][i])):
            for name, img, cond in (("base, own condition", images["base"][i][k], conditions[i]),
                                    ("steered, own condition", images["steered"][i][k], conditions[i]),
                                    ("steered, swapped condition (chance)", images["steered"][i][k],
                                     conditions[swap[i]])):
                rows[name].append(edge_agreement(cond, img, args.edge_tolerance) if kind == "edges"
                                  else region_agreement(cond, img))
    if kind == "edges":
        h, w = images["steered"][0][0].shape[:2]
        tol = default_tolerance(h, w) if args.edge_tolerance is None else args.edge_tolerance
        return {"tolerance_px": tol, **{name: {m: _summary([getattr(s, m) for s in scores])
                                               for m in ("f1", "precision", "recall", "chamfer")}
                                        for name, scores in rows.items()}}
    return {name: {"eta2": _summary(scores)} for name, scores in rows.items()}


def _scores_table(result: EvalResult) -> str:
    if not result.scores:
        return "No agreement score for this kind of condition."
    if result.score_kind == "edges":
        lines = [f"Edge agreement (Canny edges within {result.scores['tolerance_px']:.1f} px; mean ± std over "
                 f"samples)", "", "| samples vs condition | F-score | precision | recall | chamfer (px) |",
                 "|---|---|---|---|---|"]
        for name, m in result.scores.items():
            if name == "tolerance_px":
                continue
            lines.append(f"| {name} | " + " | ".join(f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}"
                                                     for k in ("f1", "precision", "recall", "chamfer")) + " |")
        return "\n".join(lines)
    lines = ["Region agreement (share of the image's colour variance explained by the layout's regions; "
             "mean ± std over samples)", "", "| samples vs condition | region agreement |", "|---|---|"]
    for name, m in result.scores.items():
        lines.append(f"| {name} | {m['eta2']['mean']:.3f} ± {m['eta2']['std']:.3f} |")
    return "\n".join(lines)


def _write_report(result: EvalResult, args, adapter: Adapter, pairs: list[Pair], size: tuple[int, int]) -> None:
    out = result.out
    head = (f"# BPS evaluation: {Path(args.adapter).name}\n\nBase `{Path(args.ckpt).name}`, {len(pairs)} held-out "
            f"pairs from `{args.data}` at {size[1]}x{size[0]} px, noise seed {args.seed}.\n")
    gap = (f"## Does the adapter use its condition?\n\n{result.gap.verdict()}\n\n"
           f"eps-MSE at fixed timesteps {list(result.gap.plan.timesteps)} and fixed noise; swapped: each pair gets "
           f"another pair's condition.\n\n{result.gap.table()}\n")
    samples = ""
    if "grid" in result.files:
        samples = (f"\n## Samples\n\n{min(args.samples, len(pairs))} pairs x {args.seeds} seeds, {args.sampler} "
                   f"{args.steps} steps, cfg {args.cfg}, strength {args.strength} (ComfyUI's sampler; steered by "
                   f"the Apply BPS code). Grid: condition | target | base alone | steered.\n\n![grid](grid.png)\n\n"
                   f"{_scores_table(result)}\n")
    text = head + "\n" + gap + samples
    result.files["report_md"] = out / "report.md"
    result.files["report_md"].write_text(text)
    data = {"adapter": str(args.adapter), "ckpt": str(args.ckpt), "data": str(args.data), "pairs": len(pairs),
            "size": list(size), "hint_meaning": adapter.hint_meaning, "gap": result.gap.to_dict(),
            "score_kind": result.score_kind, "scores": result.scores,
            "samples": {"count": min(args.samples, len(pairs)), "seeds": args.seeds, "steps": args.steps,
                        "cfg": args.cfg, "sampler": args.sampler, "scheduler": args.scheduler,
                        "strength": args.strength}}
    result.files["report_json"] = out / "report.json"
    result.files["report_json"].write_text(json.dumps(data, indent=1, default=float))
    print(text, flush=True)
