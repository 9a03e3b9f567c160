#!/usr/bin/env python
"""Try BPS with no GPU and no downloads: a miniature SD1.5, an adapter, and how well it steers.

    COMFYUI_PATH=/path/to/ComfyUI python train/try_mini_base.py

One command, four phases, each with a progress bar:

1. the mini base (``train/mini_base``): a small SD1.5 UNet trained here from scratch on random
   shapes, cached in ``~/.cache/comfyui-bps`` by its recipe's hash and reused afterwards;
2. 40 training pairs (sketch -> shape), written to ``OUT/pairs``;
3. the adapter, trained by the real trainer: ``train/train_bps.py --ckpt <mini base> --data
   OUT/pairs ...``, written to ``OUT/adapter.safetensors``;
4. the evaluation on held-out sketches (``train/mini_base/evaluate.py``): ComfyUI's KSampler code
   on the mini base, alone and steered by Apply BPS's code, IoU and centroid error against the
   sketch, eps-MSE with own and swapped sketches; ``OUT/eval_seed<S>/grid.png``, ``results.md``,
   ``results.json``.

``--adapter FILE --seed S`` re-evaluates an existing adapter on conditions drawn with another seed.
``--condition sketch`` trains from the target images alone (no source/ sketches): the trainer makes
each condition with that preprocessor (``bps/condition_maps.py``) and the evaluation makes the
held-out conditions from the held-out targets the same way.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_bps  # noqa: E402  (the trainer's entry: finds and boots ComfyUI, imports the pack)

#: The adapter recipe on the mini base (train_bps.py options), chosen as the README explains.
ADAPTER_RECIPE = ["--resolution", "128", "--batch-size", "8", "--grad-accum", "1", "--lr", "1e-3",
                  "--omega", "uniform", "--steps", "400", "--num-workers", "0", "--save-every", "0",
                  "--seed", "0"]
NUM_PAIRS = 40


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option's help states its default."""
    p = argparse.ArgumentParser(prog="try_mini_base.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="mini_base_demo", metavar="DIR",
                   help="where pairs, adapter and results go. Default: ./mini_base_demo")
    p.add_argument("--seed", type=int, default=0,
                   help="evaluation seed: which held-out sketches, sampling noise and swap. Default: 0.")
    p.add_argument("--adapter", default=None, metavar="FILE",
                   help="evaluate this adapter (trained on the mini base) instead of training one. Default: train.")
    p.add_argument("--conditions", type=int, default=50, help="held-out sketches. Default: 50.")
    p.add_argument("--sample-seeds", type=int, default=2, help="samples per sketch and variant. Default: 2.")
    p.add_argument("--base", default=None, metavar="FILE",
                   help="use this mini base file (train/mini_base/build.py) instead of the cached default one. "
                        "Default: build or reuse the default recipe's.")
    p.add_argument("--base-cache", default=None, metavar="DIR",
                   help="where the mini base is cached. Default: $BPS_MINI_BASE_CACHE or ~/.cache/comfyui-bps.")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads. Default: torch's choice (all cores).")
    p.add_argument("--condition", default=None, choices=("sketch", "edges", "layout", "gray", "rgb"),
                   help="train from the target images alone, the conditions made by this preprocessor "
                        "(train_bps.py --condition); the held-out conditions are made the same way. Default: "
                        "none = the drawn outline sketches.")
    p.add_argument("--train-args", default="", metavar="'OPTS'",
                   help="extra train_bps.py options, appended to the recipe (later options win), e.g. "
                        "\"--steps 800\". Default: none.")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the four phases; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[mini base %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    train_bps.boot_comfyui(train_bps.find_comfyui())
    pack = train_bps.import_pack()
    build = importlib.import_module(f"{pack.__name__}.train.mini_base.build")
    shapes = importlib.import_module(f"{pack.__name__}.train.mini_base.shapes")
    model_file = importlib.import_module(f"{pack.__name__}.train.mini_base.model_file")
    evaluate = importlib.import_module(f"{pack.__name__}.train.mini_base.evaluate")
    bps = importlib.import_module(f"{pack.__name__}.bps")
    log = logging.getLogger("bps.mini_base")
    out = Path(args.out)
    times = {}

    t0 = time.perf_counter()
    base_path = Path(args.base) if args.base else build.ensure_mini_base(cache_dir=args.base_cache)
    times["mini base"] = time.perf_counter() - t0

    if args.adapter:
        adapter_path = Path(args.adapter)
    else:
        t0 = time.perf_counter()
        layouts = shapes.random_layouts(evaluate.TRAIN_LAYOUT_SEED, NUM_PAIRS)
        if args.condition:  # the targets and their captions only: the trainer makes the conditions
            pairs = shapes.write_image_folder(out / "images", layouts)
            condition = ["--condition", args.condition]
        else:
            pairs = shapes.write_pair_folder(out / "pairs", layouts)
            condition = []
        adapter_path = out / "adapter.safetensors"
        train_argv = ["--ckpt", str(base_path), "--data", str(pairs), "--out", str(adapter_path), "--overwrite",
                      *ADAPTER_RECIPE, *condition, *args.train_args.split()]
        log.info("training the adapter: python train/train_bps.py %s", " ".join(train_argv))
        code = train_bps.main(train_argv)
        if code:
            return code
        times["adapter"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model, _ = model_file.load_mini_base(base_path)
    adapter = bps.load_adapter(adapter_path)
    result = evaluate.evaluate(model, adapter, seed=args.seed, conditions=args.conditions,
                               sample_seeds=args.sample_seeds)
    paths = evaluate.write_results(result, out / f"eval_seed{args.seed}")
    times["evaluation"] = time.perf_counter() - t0
    print(result.table())
    print("times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    print(f"grid: {paths['grid']}\ntable: {paths['table']}\nnumbers: {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
