"""Resumable training checkpoints, written atomically.

A checkpoint is a folder ``step_00001234/`` holding ``tensors.safetensors`` (adapter weights and
optimizer moments, fp32) and ``state.pt`` (step, optimizer hyper-parameters, every RNG state,
the run's fingerprint). It is written under a temporary name and renamed into place, so an
interrupted write never leaves a checkpoint that looks complete; a checkpoint that still fails
to load is skipped in favour of the previous one.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("bps.train")

_PREFIX = "step_"
_TMP_PREFIX = ".tmp_"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------- RNG state

def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG state a training step can touch: python, numpy, torch (CPU and CUDA), ours."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


# ------------------------------------------------------------------------ optimizer flattening

def flatten_state(network_sd: dict[str, torch.Tensor], optimizer_sd: dict[str, Any]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split network + optimizer state into flat tensors (for safetensors) and the small rest."""
    tensors = {f"network.{k}": v.detach().contiguous() for k, v in network_sd.items()}
    optim_state = {}
    for pid, pstate in optimizer_sd["state"].items():
        kept = {}
        for k, v in pstate.items():
            if torch.is_tensor(v) and v.ndim > 0:
                tensors[f"optimizer.{pid}.{k}"] = v.detach().contiguous()
            else:
                kept[k] = v
        optim_state[pid] = kept
    rest = {"param_groups": optimizer_sd["param_groups"], "state": optim_state}
    return tensors, rest


def unflatten_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`flatten_state`: (network state dict, optimizer state dict)."""
    network = {k[len("network."):]: v for k, v in tensors.items() if k.startswith("network.")}
    state = {pid: dict(v) for pid, v in rest["state"].items()}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    return network, {"state": state, "param_groups": rest["param_groups"]}


# -------------------------------------------------------------------------- save, list, load

def checkpoint_path(ckpt_dir: str | Path, step: int) -> Path:
    """Folder of the checkpoint taken after ``step`` optimizer steps."""
    return Path(ckpt_dir) / f"{_PREFIX}{step:08d}"


def save_checkpoint(ckpt_dir: str | Path, step: int, tensors: dict[str, torch.Tensor],
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the ``keep`` newest ones."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(ckpt_dir, step)
    tmp = ckpt_dir / f"{_TMP_PREFIX}{final.name}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(tensors, str(tmp / "tensors.safetensors"))
    torch.save(state, tmp / "state.pt")
    for f in ("tensors.safetensors", "state.pt"):
        _fsync_file(tmp / f)
    _fsync_dir(tmp)
    if final.exists():  # same step saved again (e.g. Ctrl-C right after a periodic save)
        old = ckpt_dir / f"{_TMP_PREFIX}old_{final.name}.{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    for _, old_path in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old_path, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir`` as (step, folder), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit():
            found.append((int(p.name[len(_PREFIX):]), p))
    return sorted(found)


def remove_stale_temporaries(ckpt_dir: str | Path) -> None:
    """Delete half-written checkpoint folders left by a killed run."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, state) of one checkpoint folder."""
    path = Path(path)
    tensors = load_file(str(path / "tensors.safetensors"))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    return tensors, state


def load_latest_checkpoint(ckpt_dir: str | Path
                           ) -> tuple[int, Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint that loads, as (step, folder, tensors, state); None if there is none."""
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            tensors, state = load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to the previous one
            log.warning("checkpoint %s cannot be read (%s); trying the previous one", path, e)
            continue
        return step, path, tensors, state
    return None
