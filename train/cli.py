"""Command line of the BPS trainer (argparse only: --help works without torch or ComfyUI)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .arg_types import non_negative_int, positive_int, resolution

PRESETS = ("paper", "uniform", "E", "M", "D", "EM", "MD", "EMD")
# Spelled out here (train.optimizers imports torch; --help must work without it).
OPTIMIZER_KINDS = ("adamw", "adamw8bit", "adafactor")
WEIGHTS_DTYPE_NAMES = ("fp32", "bf16")
#: --low-vram: bf16 weights and a small optimizer state take B_phi's training state from 10 GiB
#: to about 4 GiB; batch 1 x 16 accumulation keeps the official batch of 16. The optimizer is
#: 8-bit AdamW where bitsandbytes is installed (AdamW's dynamics, as the official recipe), else
#: Adafactor (no extra package).
LOW_VRAM = {"optimizer": None, "weights_dtype": "bf16", "mixed_precision": "bf16",
            "gradient_checkpointing": True, "batch_size": 1, "grad_accum": 16}
#: --condition: each kind's channels and hint meaning (spelled out here so --help needs no torch;
#: tests check they equal bps.condition_maps.PREPROCESSORS).
CONDITION_KINDS = {"sketch": (1, "sketch"), "edges": (1, "edges"), "layout": (3, "layout"), "gray": (1, "grayscale"),
                   "rgb": (3, "image")}
LOW_VRAM_TEXT = ("--optimizer adamw8bit (adafactor without bitsandbytes) --weights-dtype bf16 --mixed-precision "
                 "bf16 --gradient-checkpointing --batch-size 1 --grad-accum 16")


def bitsandbytes_installed() -> bool:
    """Whether bitsandbytes is installed (found, not imported: --help stays free of torch)."""
    import importlib.util
    try:
        return importlib.util.find_spec("bitsandbytes") is not None
    except ValueError:  # present in sys.modules as None: imports of it are blocked
        return False

DESCRIPTION = """\
Train a Bayesian Power Steering (BPS) adapter for a frozen SD1.5 or SDXL checkpoint (or a
fine-tune of either), with the official recipe by default (AdamW, lr 1e-5, MSE on the model's own
prediction, epsilon or v, on its noise schedule, a generic prompt 1/3 of the time). SDXL is
detected from the checkpoint: both text encoders, the pooled output and the size/crop embedding
(original = target = training size, crop 0) condition the UNet as in ComfyUI at that size. The UNet is steered by the same injection code the BPSApply node uses, so the
adapter behaves in ComfyUI exactly as it did in training. Runs under torchrun for several GPUs.

Data layouts (--data DIR):
  official  DIR/source/*, DIR/target/* and one JSON or JSON-lines file whose records pair
            "source", "target" and "prompt" (string or list of captions)
  plain     same file names in DIR/source/ and DIR/target/, captions in target/NAME.txt or
            DIR/captions/NAME.txt, or one --prompt for all pairs
Condition inputs (the four official configurations):
  sketch    --hint-channels 1: source/NAME.png as luminance (default)
  layout    --hint-channels 3: source/NAME.png as RGB
  style     --hint-channels 3 --extra-map: source/NAME.png as RGB plus extra/NAME.png, a grey
            map of the same size (official BPS_forstyle)
  style2    --hint-channels 24: source/NAME.npy, 24 channels at latent resolution (1/8 of the
            target's width and height), shaped (24, h, w) or (h, w, 24)
From images alone (--condition KIND): DIR/target/* plus captions (or --prompt), no source/;
the trainer makes each condition from its target image with the preprocessor the "BPS Condition
from Image" node runs, caches it with the latents and records it in the adapter:
  sketch    light strokes on black (difference of Gaussians)      sigma=1.4 threshold=0.005 softness=0.015
  edges     Canny edges                                             low=40 high=80 sigma=1 thickness=1
  layout    flat colour regions (k-means in Lab), 3 channels      colors=8 smooth=6
  gray/rgb  the image as luminance / as is                          (no parameters)
  Sizes (sigma, thickness, smooth) are pixels of a 512x512 image, scaled with the image.
  Change a parameter with --condition-param KEY=VALUE (repeatable).
Without --data the trainer draws a demo set of 40 shape sketches and trains on it.
"""

EPILOG = """\
examples:
  python train/train_bps.py --ckpt models/checkpoints/v1-5-pruned-emaonly.safetensors --out my_sketch.safetensors
  python train/train_bps.py --ckpt sd15.safetensors --data data/ --out seg.safetensors --hint-channels 3 --steps 5000
  torchrun --nproc_per_node 4 train/train_bps.py --ckpt sd15.safetensors --data data/ --out a.safetensors
  python train/train_bps.py --ckpt sd15.safetensors --data data/ --out a.safetensors --resume
  python train/train_bps.py --ckpt sd15.safetensors --data photos/ --out photo_sketch.safetensors --condition sketch
  python train/train_bps.py --ckpt sd15.safetensors --data photos/ --out edges.safetensors --condition edges \\
      --condition-param low=60 --condition-param high=120
  python train/train_bps.py --ckpt sd_xl_base_1.0.safetensors --data data/ --out sketch_xl.safetensors
"""


def build_parser() -> argparse.ArgumentParser:
    """The trainer's argument parser; every option's help states its default."""
    p = argparse.ArgumentParser(prog="train_bps.py", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("files")
    io.add_argument("--ckpt", required=True, metavar="CHECKPOINT",
                    help="SD1.5 or SDXL checkpoint (.safetensors/.ckpt with UNet, VAE and text encoders), loaded "
                         "by ComfyUI's own loader, which detects the family and the prediction type. Required.")
    io.add_argument("--data", default=None, metavar="DIR",
                    help="training data folder (layouts above). Default: none = the built-in demo set.")
    io.add_argument("--out", required=True, metavar="ADAPTER.safetensors",
                    help="adapter file to write. Checkpoints go to OUT_STEM_checkpoints/ next to it. Required.")
    io.add_argument("--prompt", default=None,
                    help="caption for pairs that have none (plain layout). Default: none.")
    io.add_argument("--cache-dir", default=None, metavar="DIR",
                    help="where latents and text embeddings are cached (reused while data, checkpoint and "
                         "resolution are unchanged). Default: OUT_STEM_cache/ next to --out.")
    io.add_argument("--overwrite", action="store_true",
                    help="replace an existing --out file and start its checkpoints afresh. Default: off "
                         "(refuse).")
    io.add_argument("--resume", action="store_true",
                    help="continue the run that writes --out from its latest checkpoint (same optimizer "
                         "state, step, RNG and data order) up to --steps. Default: off.")
    io.add_argument("--skip-bad", action="store_true",
                    help="train without the bad pairs instead of stopping with the list of problems. "
                         "Default: off.")

    rec = p.add_argument_group("recipe")
    rec.add_argument("--steps", type=positive_int, default=None,
                     help="optimizer steps of the whole run (a resumed run stops here too). Default: as many "
                          "as --epochs takes.")
    rec.add_argument("--epochs", type=positive_int, default=None,
                     help="passes over the data, used when --steps is not given. Default: 16 (official recipe).")
    rec.add_argument("--resolution", type=resolution, default=512,
                     help="training size: images are resized to about RES x RES pixels, sides multiples of 64, "
                          "keeping the data's aspect ratio (every image is centre-cropped to the first target's "
                          "aspect ratio). Default: 512. Use 1024 for SDXL.")
    rec.add_argument("--batch-size", type=positive_int, default=4,
                     help="pairs per forward pass per process. Default: 4 (x --grad-accum 4 = the official "
                          "batch of 16).")
    rec.add_argument("--grad-accum", type=positive_int, default=4,
                     help="forward passes per optimizer step (gradients are summed). Default: 4.")
    rec.add_argument("--lr", type=float, default=1e-5, help="learning rate of the optimizer (--optimizer). Default: 1e-5.")
    rec.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay. Default: 0.01.")
    rec.add_argument("--warmup-steps", type=non_negative_int, default=0,
                     help="linear learning-rate warm-up steps, then constant. Default: 0.")
    rec.add_argument("--generic-prompt-prob", type=float, default=1 / 3,
                     help='chance of replacing the caption by "a high-quality, detailed, and professional '
                          'image" (official recipe). Default: 0.333.')
    rec.add_argument("--omega", default="paper", choices=PRESETS,
                     help="omega preset of the encoder and middle ports (fixed, not trained; decoder ports "
                          "use 1 as in the official recipe). Stored in the adapter. Default: paper.")
    rec.add_argument("--condition", default=None, choices=tuple(CONDITION_KINDS),
                     help="make each condition from its target image with this preprocessor (data folder: "
                          "target/ and captions, no source/); see above. Default: none = read source/.")
    rec.add_argument("--condition-param", action="append", default=[], metavar="KEY=VALUE",
                     help="a parameter of the --condition preprocessor, e.g. sigma=2 (repeatable). Default: "
                          "the preprocessor's defaults (listed above).")
    rec.add_argument("--hint-channels", type=int, default=None, choices=(1, 3, 24),
                     help="channels of the condition: 1 (sketch, edges), 3 (layout, segmentation, RGB) or 24 "
                          "(a .npy map at latent resolution, the official style2 configuration). Default: the "
                          "--condition's (1 for sketch, edges, gray; 3 for layout, rgb), else 1.")
    rec.add_argument("--extra-map", action="store_true",
                     help="style adapter (official BPS_forstyle): an RGB condition plus a grey extra map per "
                          "pair from DIR/extra/ (same name and size as the source); needs --hint-channels 3. "
                          "Default: off.")
    rec.add_argument("--hint-meaning", default=None,
                     help='what the condition image is, stored in the adapter ("sketch", "segmentation"...). '
                          "Default: the --condition's (sketch, edges, layout, grayscale, image), else sketch for "
                          "1 channel, image for 3, style with --extra-map, style2 for 24.")
    rec.add_argument("--seed", type=int, default=0, help="seed of initialisation, noise and data order. "
                                                         "Default: 0.")

    run = p.add_argument_group("speed and memory")
    run.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"),
                     help="autocast dtype of the forward pass; fp16 adds a GradScaler. The adapter's weights "
                          "stay in --weights-dtype. Default: no.")
    run.add_argument("--gradient-checkpointing", action="store_true",
                     help="recompute B_phi blocks and the frozen UNet's ResBlocks/transformers in the "
                          "backward pass: much less activation memory, about 30%% slower. Default: off.")
    run.add_argument("--num-workers", type=non_negative_int, default=2,
                     help="data loader worker processes (and threads for the data check). Default: 2.")
    run.add_argument("--optimizer", default="adamw", choices=OPTIMIZER_KINDS,
                     help="adamw: torch AdamW, two fp32 moments = 8 bytes per weight (5.0 GiB for B_phi; the "
                          "official recipe). adamw8bit: AdamW with 8-bit moments from the optional package "
                          "bitsandbytes (pip install bitsandbytes), about 2 bytes per weight. adafactor: "
                          "torch.optim.Adafactor, no first moment and a second moment factored over each "
                          "weight's last two dimensions, about 2.75 bytes per weight (1.7 GiB), no extra "
                          "package; its step is --lr like AdamW's, but without AdamW's momentum it overshoots at large rates (keep the recipe's 1e-5). A run resumes only with the optimizer "
                          "it started with. Default: adamw.")
    run.add_argument("--weights-dtype", default="fp32", choices=WEIGHTS_DTYPE_NAMES,
                     help="dtype of B_phi's trainable weights and their gradients. bf16 halves both (2.5 GiB "
                          "each -> 1.25 GiB) at the cost of precision: 8 significant bits, so each weight is "
                          "known to about 0.4%% and gradients summed over --grad-accum lose low-order bits; "
                          "updates are computed in fp32 and stochastically rounded to bf16 (plain bf16 "
                          "updates of lr 1e-5 would round back to the old weight and stall). B_phi then "
                          "computes in bf16. Default: fp32.")
    run.add_argument("--low-vram", action="store_true",
                     help="preset for 8 GB GPUs at 512x512: " + LOW_VRAM_TEXT + " (options given "
                          "explicitly win); prints what it chose. Default: off.")

    out = p.add_argument_group("checkpoints, logs and samples")
    out.add_argument("--save-every", type=non_negative_int, default=500,
                     help="write a resumable checkpoint every N steps (0 = only at the end or on Ctrl-C). "
                          "Default: 500.")
    out.add_argument("--keep-checkpoints", type=positive_int, default=2,
                     help="how many recent checkpoints to keep. Default: 2.")
    out.add_argument("--validate-every", type=non_negative_int, default=0,
                     help="every N steps (and at the end) render validation samples with ComfyUI's sampler "
                          "and the BPS-attached model, saved as PNGs in the checkpoint folder, and log the "
                          "own-vs-swapped condition eps-MSE (--validation-gap-pairs) (0 = off). Default: 0.")
    out.add_argument("--validation-steps", type=positive_int, default=12,
                     help="sampler steps of a validation sample. Default: 12.")
    out.add_argument("--validation-count", type=positive_int, default=2,
                     help="how many training pairs (the first ones) are rendered. Default: 2.")
    out.add_argument("--validation-cfg", type=float, default=7.5,
                     help="classifier-free guidance of validation samples. Default: 7.5.")
    out.add_argument("--validation-gap-pairs", type=non_negative_int, default=8,
                     help="at every validation, the eps-MSE of the first N training pairs at 4 fixed timesteps "
                          "and noise with each pair's own condition and with another pair's (swapped), logged "
                          "as eps_own/eps_swapped/eps_base in loss.csv and drawn in loss.png: own below swapped "
                          "means the run is learning its condition (0 = off). Default: 8.")
    out.add_argument("--no-progress", action="store_true", help="no progress bar (logs only). Default: off.")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.out.lower().endswith(".safetensors"):
        parser.error(f"--out must end in .safetensors, got {args.out}")
    if not 0.0 <= args.generic_prompt_prob <= 1.0:
        parser.error(f"--generic-prompt-prob must be between 0 and 1, got {args.generic_prompt_prob}")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    _resolve_condition(parser, args)
    if args.extra_map and args.hint_channels != 3:
        parser.error(f"--extra-map goes with an RGB condition: pass --hint-channels 3 (got {args.hint_channels})")
    if (args.extra_map or args.hint_channels == 24) and not args.data:
        parser.error("the built-in demo set has sketches only: style adapters (--extra-map, --hint-channels 24) "
                     "need --data DIR")
    if args.hint_meaning is None:  # train.hint_layout.HintLayout.default_meaning (this file imports nothing)
        args.hint_meaning = "style" if args.extra_map else {1: "sketch", 3: "image", 24: "style2"}[args.hint_channels]
    if args.low_vram:
        _apply_low_vram(parser, argv, args)
    if args.weights_dtype == "bf16" and args.mixed_precision == "fp16":
        parser.error("--weights-dtype bf16 with --mixed-precision fp16: B_phi would compute in bf16 inside an "
                     "fp16 UNet with fp16 loss scaling; use --mixed-precision bf16 (or no) with bf16 weights")
    return args


def _resolve_condition(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--condition sets the hint channels (which must agree with an explicit --hint-channels)."""
    if args.condition is None:
        if args.condition_param:
            parser.error("--condition-param sets a parameter of the --condition preprocessor; pass --condition "
                         "sketch (or edges, layout) too")
        if args.hint_channels is None:
            args.hint_channels = 1
        return
    channels, meaning = CONDITION_KINDS[args.condition]
    if not args.data:
        parser.error(f"--condition {args.condition} makes the conditions from your images: pass --data DIR with "
                     f"target/ images and captions (the built-in demo set has its own sketches)")
    if args.extra_map or args.hint_channels == 24:
        parser.error(f"--condition {args.condition} makes a {channels}-channel condition image; style adapters "
                     f"(--extra-map, --hint-channels 24) need their own source/ and extra/ files")
    if args.hint_channels not in (None, channels):
        parser.error(f"--condition {args.condition} makes {channels}-channel conditions, but --hint-channels is "
                     f"{args.hint_channels}; leave --hint-channels out")
    args.hint_channels = channels
    if args.hint_meaning is None:
        args.hint_meaning = meaning


def _explicit_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Destinations the user gave on the command line (a parse where nothing has a default)."""
    quiet = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_true"
            else:
                kwargs["nargs"] = action.nargs
            quiet.add_argument(*action.option_strings, **kwargs)
    given, _ = quiet.parse_known_args(argv)
    return set(vars(given))


def _apply_low_vram(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace) -> None:
    explicit = _explicit_options(parser, argv)
    chosen, kept = [], []
    for dest, value in LOW_VRAM.items():
        if dest == "optimizer":
            value = "adamw8bit" if bitsandbytes_installed() else "adafactor"
        flag = "--" + dest.replace("_", "-")
        if dest in explicit:
            kept.append(f"{flag} {getattr(args, dest)}" if not isinstance(value, bool) else flag)
            continue
        setattr(args, dest, value)
        chosen.append(flag if value is True else f"{flag} {value}")
    note = "--low-vram: " + " ".join(chosen)
    if "optimizer" not in explicit:
        note += (" (bitsandbytes is installed)" if args.optimizer == "adamw8bit" else
                 " (bitsandbytes is not installed; pip install bitsandbytes for 8-bit AdamW)")
    if kept:
        note += "; kept as given: " + ", ".join(kept)
    args.preset_note = note
    # Before any model load, so the choice shows at once; rank 0 only under torchrun.
    if os.environ.get("RANK", "0") == "0":
        print(note, file=sys.stderr, flush=True)


def checkpoint_dir(out: str | Path) -> Path:
    """Folder of the resumable checkpoints and validation samples of the run writing ``out``."""
    out = Path(out)
    return out.with_name(out.stem + "_checkpoints")


def default_cache_dir(out: str | Path) -> Path:
    """Default cache folder of the run writing ``out``."""
    out = Path(out)
    return out.with_name(out.stem + "_cache")
