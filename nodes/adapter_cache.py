"""Loaded adapters kept across prompts, so a re-executed Load BPS Adapter reads nothing.

ComfyUI's default (CLASSIC) cache keeps only the outputs the current prompt uses: one prompt
without the BPS nodes in between drops the loaded adapter, and the next BPS prompt would read and
check the 1.3 GB file again (seconds on every switch). :class:`AdapterCache` keeps the last few
adapters, keyed by the file's identity (:func:`file_identity`: real path, device, inode, size and
modification time) and the dtype, so a re-executed loader is a dictionary look-up, while a file
retrained or replaced under the same name (a new inode or mtime) is loaded afresh.

Each entry also holds the adapter network's ModelPatcher, so ComfyUI's model manager keeps
seeing it as one loaded model instead of a new one (and never finds a network whose patcher
died, which it would treat as a leak and answer with a full garbage collection).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Callable

import torch

from ..bps.adapter_file import Adapter, load_adapter
from .model_management import adapter_model_patcher

#: Environment variable: how many adapters to keep (default 2: a two-adapter workflow).
CAPACITY_ENV = "BPS_ADAPTER_CACHE"
DEFAULT_CAPACITY = 2


def file_identity(path: str | os.PathLike) -> tuple:
    """(real path, device, inode, size, mtime_ns) of a file: changes whenever the file is replaced
    (the trainer and save_adapter write a new file and rename it over the old) or rewritten."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _capacity_from_env() -> int:
    try:
        return max(0, int(os.environ.get(CAPACITY_ENV, DEFAULT_CAPACITY)))
    except ValueError:
        return DEFAULT_CAPACITY


class AdapterCache:
    """The last ``capacity`` loaded adapters, least recently used evicted first.

    Attributes:
        loads: how many times a file was actually read (for tests and benchmarks).
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY, loader: Callable[..., Adapter] = load_adapter):
        self.capacity = capacity
        self._loader = loader
        self._entries: OrderedDict[tuple, tuple[Adapter, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, path: str | os.PathLike, dtype: torch.dtype) -> Adapter:
        """The adapter in ``path`` with weights in ``dtype``: cached if the file is unchanged, else read.

        Raises:
            AdapterError: as :func:`bps.load_adapter` (a broken file is never cached).
        """
        key = (*file_identity(path), str(dtype))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[0]
        adapter = self._loader(path, dtype=dtype)
        self.loads += 1
        if self.capacity > 0:
            with self._lock:
                # An older version of the same file is useless now: drop it before it costs memory.
                for old in [k for k in self._entries if k[0] == key[0]]:
                    del self._entries[old]
                # The file, not the network, as the patcher's source: core's MultiGPU deep clone
                # and non-dynamic delegate re-read it, as core loaders re-read theirs.
                self._entries[key] = (adapter, adapter_model_patcher(adapter.network, adapter.path))
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        return adapter

    def clear(self) -> None:
        """Forget every adapter."""
        with self._lock:
            self._entries.clear()


#: The nodes' process-wide cache.
ADAPTERS = AdapterCache(_capacity_from_env())
