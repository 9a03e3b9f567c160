"""Resumable training checkpoints, written atomically.

A checkpoint is a folder ``step_00001234/`` holding ``tensors.safetensors`` (adapter weights and
optimizer state tensors in their own dtypes) and ``state.pt`` (step, optimizer kind and
hyper-parameters, every RNG state, the run's fingerprint). It is written under a temporary name and renamed into place, so an
interrupted write never leaves a checkpoint that looks complete; a checkpoint that still fails
to load is skipped in favour of the previous one.
"""

from __future__ import annotations

import copy
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

def _split_tensors(prefix: str, value: Any, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    """Move every tensor with a dimension out of ``value`` (nested dicts too) into ``tensors``
    under dotted names; returns what is left (scalars, 0-d tensors, hyper-parameters)."""
    if isinstance(value, dict) and all(isinstance(k, str) and "." not in k for k in value):
        return {k: _split_tensors(f"{prefix}.{k}", v, tensors, seen) for k, v in value.items()}
    if torch.is_tensor(value) and value.ndim > 0:
        t = value.detach().contiguous()
        # safetensors refuses tensors that share memory (bitsandbytes shares its quantisation
        # maps between parameters): later sharers are copied, they are a few hundred floats.
        key = t.untyped_storage().data_ptr()
        tensors[prefix] = t.clone() if key in seen else t
        seen.add(key)
        return _MOVED
    return value


#: Marks where a tensor was taken out; it goes back there on loading.
_MOVED = "__tensor_in_safetensors__"


def flatten_state(network_sd: dict[str, torch.Tensor], optimizer_sd: dict[str, Any]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split network + optimizer state into flat tensors (for safetensors) and the small rest.

    Works for every optimizer the trainer builds: AdamW's moments, Adafactor's row/column
    factors, bitsandbytes' nested quantisation state, and extra top-level entries such as the
    stochastic-rounding generator, which stay in the rest.
    """
    tensors = {f"network.{k}": v.detach().contiguous() for k, v in network_sd.items()}
    seen: set[int] = set()
    optim_state = {pid: _split_tensors(f"optimizer.{pid}", pstate, tensors, seen)
                   for pid, pstate in optimizer_sd["state"].items()}
    rest = {k: v for k, v in optimizer_sd.items() if k != "state"}
    rest["state"] = optim_state
    return tensors, rest


def _put_back(value: Any, path: list[str], tensor: torch.Tensor) -> None:
    for name in path[:-1]:
        value = value.setdefault(name, {})
    value[path[-1]] = tensor


def unflatten_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`flatten_state`: (network state dict, optimizer state dict)."""
    network = {k[len("network."):]: v for k, v in tensors.items() if k.startswith("network.")}
    state = {pid: copy.deepcopy(v) for pid, v in rest["state"].items()}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, pid, *path = k.split(".")
            _put_back(state.setdefault(int(pid), {}), path, v)
    optimizer = {k: v for k, v in rest.items() if k != "state"}
    optimizer["state"] = state
    return network, optimizer


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


def read_latest_state(ckpt_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """(folder, state) of the newest checkpoint whose small ``state.pt`` loads, without reading its
    tensors: enough to check a resume's options before any model is loaded."""
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - unreadable: the full load falls back the same way
            continue
    return None


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
