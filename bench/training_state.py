"""B_phi's training state (weights + gradients + optimizer state) for any UNet, per optimizer and
trainable-weight dtype, measured without building the whole network.

    python bench/training_state.py [--family sd15 sdxl] [--output bench/results/training_state.txt]

The state is a sum over parameters, and what an optimizer keeps for a parameter depends only on
its shape and dtype, so each distinct parameter shape of B_phi (built on the meta device: no
memory) is trained for one step by the trainer's own optimizer (train/optimizers.py, real
tensors on the CPU), its state bytes are counted as the trainer counts them
(``optimizer_state_bytes``), and multiplied by how often the shape occurs. The result is the
exact tensor bytes of the full network's state, as the trainer logs at its first step, at the
memory of one parameter: SDXL's 405M-parameter B_phi in fp32 AdamW needs 6 GB as a whole.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bps.network import BPSConfig, BPSNetwork  # noqa: E402
from bps.unet_shape import SD15_SHAPE, SDXL_SHAPE  # noqa: E402
from train.optimizers import (OptimizerChoice, bitsandbytes_available, make_optimizer,  # noqa: E402
                              optimizer_state_bytes)

SHAPES = {"sd15": SD15_SHAPE, "sdxl": SDXL_SHAPE}
COMBOS = ["adamw:fp32", "adamw8bit:fp32", "adafactor:fp32", "adamw:bf16", "adamw8bit:bf16", "adafactor:bf16"]
GIB = 2 ** 30


def parameter_shapes(family: str) -> collections.Counter:
    """How often each parameter shape occurs in B_phi for ``family`` (1-channel hint)."""
    with torch.device("meta"):
        net = BPSNetwork(BPSConfig.for_unet(SHAPES[family]))
    return collections.Counter(tuple(p.shape) for p in net.parameters())


def state_bytes(shapes: collections.Counter, choice: OptimizerChoice) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes of a network with these parameter shapes."""
    weights = grads = state = 0
    g = torch.Generator().manual_seed(0)
    for shape, count in shapes.items():
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(choice.dtype))
        p.grad = torch.randn(shape, generator=g).to(choice.dtype)
        opt = make_optimizer([p], choice, lr=1e-5, weight_decay=1e-2, seed=0)
        opt.step()
        weights += count * p.numel() * p.element_size()
        grads += count * p.grad.numel() * p.grad.element_size()
        state += count * optimizer_state_bytes(opt)
    return weights, grads, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--combos", nargs="+", default=COMBOS)
    parser.add_argument("--output", help="also write the table to this file")
    args = parser.parse_args()
    lines = ["family | parameters | --optimizer | --weights-dtype | weights + gradients + optimizer GiB | state GiB",
             "--- | --- | --- | --- | --- | ---"]
    for family in args.family:
        shapes = parameter_shapes(family)
        n = sum(count * torch.Size(shape).numel() for shape, count in shapes.items())
        for combo in args.combos:
            kind, dtype = combo.split(":")
            if kind == "adamw8bit" and not bitsandbytes_available():
                lines.append(f"{family} | {n:,} | {kind} | {dtype} | (bitsandbytes not installed) |")
                continue
            w, g, s = state_bytes(shapes, OptimizerChoice(kind, dtype))
            lines.append(f"{family} | {n:,} | {kind} | {dtype} | {w / GIB:.2f} + {g / GIB:.2f} + {s / GIB:.2f} | "
                         f"{(w + g + s) / GIB:.2f}")
            print(lines[-1], flush=True)
    text = "# python bench/training_state.py " + " ".join(sys.argv[1:]) + "\n" + "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
