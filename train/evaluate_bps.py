#!/usr/bin/env python
"""Evaluate a BPS adapter on held-out pairs: does it use its condition? (see ``--help``)

    python train/evaluate_bps.py --ckpt BASE_CHECKPOINT --adapter ADAPTER.safetensors --data HELD_OUT_DIR

Boots ComfyUI and imports the pack exactly as ``train/train_bps.py`` does (the same helpers), then
hands over to ``train/evaluation.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load_entry():
    """train/train_bps.py loaded by path (it imports nothing heavy): the shared boot helpers."""
    name = "comfyui_bps_train_entry"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "train_bps.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _setup_logging() -> None:
    logger = logging.getLogger("bps.eval")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[BPS eval %(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None, **run_kwargs) -> int:
    """Command-line entry; returns the exit code (0 done, 1 error)."""
    entry = _load_entry()
    args = entry.load_standalone("eval_cli").parse_args(argv)
    _setup_logging()
    entry.boot_comfyui(entry.find_comfyui())
    pack = entry.import_pack()
    evaluation = importlib.import_module(f"{pack.__name__}.train.evaluation")
    base_model = importlib.import_module(f"{pack.__name__}.train.base_model")
    bps = importlib.import_module(f"{pack.__name__}.bps")
    try:
        evaluation.run(args, **run_kwargs)
    except (evaluation.EvalError, base_model.BaseModelError, bps.BPSError) as e:
        logging.getLogger("bps.eval").error("error: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
