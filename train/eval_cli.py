"""Command line of ``train/evaluate_bps.py``. Imports nothing of the pack, so ``--help`` and
argument errors come before ComfyUI is booted."""

from __future__ import annotations

import argparse
from pathlib import Path

from .arg_types import non_negative_int, positive_int, resolution

DESCRIPTION = """\
Evaluate a BPS adapter on held-out condition/image pairs: does it use its condition?

1. eps-MSE on the held-out pairs at fixed timesteps and noise, per timestep band, for the base
   alone, the steered model with each pair's own condition, and with a swapped condition (another
   pair's); the gap swapped - own with its 95% CI says whether the adapter uses its condition;
2. samples with ComfyUI's sampler (KSampler's code) for the base alone and the model steered by
   the Apply BPS attach code, several seeds, as a picture grid: condition | target | base | steered;
3. for sketch adapters, edge agreement (OpenCV Canny, F-score within a tolerance, chamfer
   distance) of the samples with their condition; for layout and segmentation adapters, region
   agreement (the share of the image's colour variance explained by the layout's regions); each
   also against another pair's condition (chance level).

The held-out folder uses the trainer's data layouts (see train/train_bps.py --help); the
condition kind (1 or 3 channels, style extra map, 24-channel map) comes from the adapter. For an
adapter trained with --condition (conditions made from the images), a folder without source/ gets
its conditions made from its targets by the adapter's recorded preprocessor, as in training.
Writes report.md, report.json and grid.png to --out.
"""

EPILOG = """\
examples:
  python train/evaluate_bps.py --ckpt sd15.safetensors --adapter my_sketch.safetensors --data held_out/
  python train/evaluate_bps.py --ckpt sd15.safetensors --adapter seg.safetensors --data val/ --samples 4 --seeds 3
"""

SCORES = ("auto", "edges", "regions", "none")


def build_parser() -> argparse.ArgumentParser:
    """The evaluation's argument parser; every option's help states its default."""
    p = argparse.ArgumentParser(prog="evaluate_bps.py", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("files")
    io.add_argument("--ckpt", required=True, metavar="BASE_CHECKPOINT",
                    help="the base checkpoint the adapter was trained on, loaded by ComfyUI's loader. Required.")
    io.add_argument("--adapter", required=True, metavar="ADAPTER.safetensors", help="the BPS adapter. Required.")
    io.add_argument("--data", required=True, metavar="DIR",
                    help="held-out pairs (the trainer's layouts), never seen in training. Required.")
    io.add_argument("--out", default=None, metavar="DIR",
                    help="where report.md, report.json and grid.png go. Default: ADAPTER_STEM_eval/ next to "
                         "the adapter.")
    io.add_argument("--prompt", default=None, help="caption for pairs that have none. Default: none.")
    io.add_argument("--cache-dir", default=None, metavar="DIR",
                    help="latent/text cache (the trainer's format). Default: OUT/cache.")
    io.add_argument("--skip-bad", action="store_true",
                    help="evaluate without the bad pairs instead of stopping with the list. Default: off.")

    gap = p.add_argument_group("condition gap (eps-MSE)")
    gap.add_argument("--max-pairs", type=positive_int, default=50,
                     help="held-out pairs measured (the first N by name). Default: 50.")
    gap.add_argument("--per-band", type=positive_int, default=2,
                     help="fixed timesteps in each band 0-250, 250-500, 500-750, 750-1000. Default: 2.")
    gap.add_argument("--batch-size", type=positive_int, default=4, help="items per UNet call. Default: 4.")
    gap.add_argument("--seed", type=int, default=0,
                     help="seed of the fixed noise, the swap and the samples. Default: 0.")
    gap.add_argument("--resolution", type=resolution, default=None,
                     help="evaluation size, as the trainer's --resolution. Default: the adapter's training "
                          "resolution (its provenance), else 512.")

    smp = p.add_argument_group("samples")
    smp.add_argument("--samples", type=non_negative_int, default=8,
                     help="pairs sampled for the grid and the agreement scores (0 = no sampling). Default: 8.")
    smp.add_argument("--seeds", type=positive_int, default=2, help="seeds per sampled pair. Default: 2.")
    smp.add_argument("--steps", type=positive_int, default=20, help="sampler steps. Default: 20.")
    smp.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance. Default: 7.5.")
    smp.add_argument("--sampler", default="euler", help="ComfyUI sampler name. Default: euler.")
    smp.add_argument("--scheduler", default="normal", help="ComfyUI scheduler name. Default: normal.")
    smp.add_argument("--strength", type=float, default=1.0, help="Apply BPS strength. Default: 1.0.")
    smp.add_argument("--score", default="auto", choices=SCORES,
                     help="agreement score of the samples: edges (sketch adapters), regions (layout, "
                          "segmentation), none; auto picks by the adapter's hint meaning and channels. "
                          "Default: auto.")
    smp.add_argument("--edge-tolerance", type=float, default=None,
                     help="pixels within which edges match. Default: 1%% of the image diagonal (at least 1.5).")
    p.add_argument("--no-progress", action="store_true", help="no progress bars. Default: off.")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.adapter.lower().endswith(".safetensors"):
        parser.error(f"--adapter must be a .safetensors adapter file, got {args.adapter}")
    if args.cfg <= 0:
        parser.error(f"--cfg must be positive, got {args.cfg}")
    if args.out is None:
        adapter = Path(args.adapter)
        args.out = str(adapter.with_name(adapter.stem + "_eval"))
    return args
