"""The trainer's optimizers and trainable-weight dtypes, and how much memory each one holds.

``--optimizer``: ``adamw`` (torch, the official recipe: two fp32 moments, 8 bytes a parameter),
``adamw8bit`` (bitsandbytes' block-wise 8-bit moments, ~2 bytes a parameter; optional package)
or ``adafactor`` (torch.optim.Adafactor: no first moment and a second moment factored over each
weight's last two dimensions, ~2.7 bytes a parameter for B_phi's 3x3 convs).
``--weights-dtype``: ``fp32`` or ``bf16`` (half the weights and gradients; updates are computed
in fp32 and stochastically rounded, see ``train/stochastic_rounding.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from .stochastic_rounding import StochasticRoundingOptimizer

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
WEIGHTS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: torch.optim.Adafactor scales each update by max(eps2, RMS(weight)) x lr. B_phi's output convs
#: start at exactly zero, so with the default eps2 = 1e-3 they would move 1000x slower than the
#: rest; eps2 = 1 makes the step lr for every weight of RMS below 1, as in AdamW.
ADAFACTOR_EPS2 = 1.0


class OptimizerError(RuntimeError):
    """The optimizer cannot be built or its state cannot continue; the message says what to do."""


@dataclass(frozen=True)
class OptimizerChoice:
    """Which optimizer and trainable-weight dtype a run uses (recorded in every checkpoint)."""

    kind: str = "adamw"
    weights_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise OptimizerError(f"unknown optimizer {self.kind!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise OptimizerError(f"unknown weights dtype {self.weights_dtype!r}; choose one of "
                                 f"{', '.join(WEIGHTS_DTYPES)}")

    @property
    def dtype(self) -> torch.dtype:
        """torch dtype of the trainable weights (and so of their gradients)."""
        return WEIGHTS_DTYPES[self.weights_dtype]

    def describe(self) -> str:
        """The command-line options that select this choice."""
        return f"--optimizer {self.kind} --weights-dtype {self.weights_dtype}"

    def to_dict(self) -> dict[str, str]:
        """What a checkpoint records."""
        return {"kind": self.kind, "weights_dtype": self.weights_dtype}


def bitsandbytes_available() -> bool:
    """True when ``bitsandbytes`` imports (needed by ``--optimizer adamw8bit``)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install (missing CUDA libs...) is "not available" too
        return False
    return True


def _import_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as e:
        raise OptimizerError("--optimizer adamw8bit needs the optional package bitsandbytes, which is not "
                             "installed: pip install bitsandbytes (with ComfyUI's Python), or use "
                             "--optimizer adafactor, which needs no extra package") from e
    except Exception as e:  # noqa: BLE001 - bitsandbytes raises assorted errors when its binaries do not load
        raise OptimizerError(f"--optimizer adamw8bit: bitsandbytes is installed but does not load ({e}); "
                             f"reinstall it for this GPU/CUDA, or use --optimizer adafactor") from e
    return bitsandbytes


def require_backend(choice: OptimizerChoice) -> None:
    """Raise :class:`OptimizerError` now if ``choice`` needs a package that does not load."""
    if choice.kind == "adamw8bit":
        _import_bitsandbytes()


def _fp32_optimizer(params: list[Tensor], kind: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if kind == "adamw":
        # fused AdamW: one pass over the weights, no temporaries the size of the model (the adapter
        # has ~670M parameters), and 10x faster than the per-tensor loop on CPU.
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw8bit":
        return _import_bitsandbytes().optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if kind == "adafactor":
        # foreach=False: the foreach path stacks temporaries for every tensor at once.
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay, eps=(None, ADAFACTOR_EPS2),
                                     foreach=False)
    raise OptimizerError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}")


def make_optimizer(params: Iterable[Tensor], choice: OptimizerChoice, *, lr: float, weight_decay: float,
                   seed: int = 0) -> torch.optim.Optimizer | StochasticRoundingOptimizer:
    """The optimizer of ``choice`` over ``params`` (already in ``choice.dtype``).

    bf16 weights get the fp32-update + stochastic-rounding wrapper around the same optimizer,
    its dither seeded by ``seed``.

    Raises:
        OptimizerError: bitsandbytes missing for adamw8bit, or params not in the chosen dtype.
    """
    params = [p for p in params if p.requires_grad]
    wrong = {str(p.dtype) for p in params if p.dtype != choice.dtype}
    if wrong:
        raise OptimizerError(f"--weights-dtype {choice.weights_dtype} but the trainable weights are "
                             f"{', '.join(sorted(wrong))}; cast the network before building the optimizer")
    require_backend(choice)
    if choice.weights_dtype == "bf16":
        return StochasticRoundingOptimizer(params, lambda fp32: _fp32_optimizer(fp32, choice.kind, lr,
                                                                                 weight_decay), seed=seed)
    return _fp32_optimizer(params, choice.kind, lr, weight_decay)


def check_resume_choice(saved: dict[str, Any] | None, choice: OptimizerChoice, where: str) -> None:
    """Refuse to continue optimizer state written by another optimizer or weights dtype.

    Checkpoints from before these options existed hold no record: they were AdamW on fp32.
    """
    saved_choice = OptimizerChoice(**(saved or {"kind": "adamw", "weights_dtype": "fp32"}))
    if saved_choice != choice:
        raise OptimizerError(
            f"cannot resume from {where}: it was trained with {saved_choice.describe()}, this run asks for "
            f"{choice.describe()}; one optimizer's state cannot continue another's. Resume with "
            f"{saved_choice.describe()}, or start afresh with --overwrite")


# ------------------------------------------------------------------------------ memory accounting

def _tensor_bytes(value: Any, seen: set[int]) -> int:
    if torch.is_tensor(value):
        if value.device.type == "meta":
            return 0
        key = value.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in value)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | StochasticRoundingOptimizer) -> int:
    """Bytes of every tensor the optimizer keeps between steps (moments, factors, quantisation
    state, step counters), each storage counted once."""
    seen: set[int] = set()
    return sum(_tensor_bytes(s, seen) for s in optimizer.state.values())


def parameter_bytes(params: Iterable[Tensor]) -> int:
    """Bytes of the given parameters' data."""
    return sum(p.numel() * p.element_size() for p in params)


def gradient_bytes(params: Iterable[Tensor]) -> int:
    """Bytes of the given parameters' current gradients."""
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
