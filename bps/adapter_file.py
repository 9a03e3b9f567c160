"""BPS adapter files: ``.safetensors`` with the network weights and self-describing metadata.

Loading never unpickles anything. The header is read and checked by hand first, so a truncated
or corrupt file gets a message that says so instead of a raw parser error, and every problem is
reported as an :class:`AdapterError` naming the file, what is wrong, and the fix.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import AdapterError
from .network import BPSConfig, BPSNetwork
from .ports import PAPER_OMEGA

FORMAT = "bps-adapter"
FORMAT_VERSION = 1
BASE_MODEL = "sd15"
INJECTION_RULE = ("residual of port i times omega_i is added to the output of every ResBlock and every "
                  "SpatialTransformer of the port's UNet block; Downsample/Upsample get nothing")

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
_SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEADER = 100 * 2 ** 20


@dataclass
class Adapter:
    """A loaded BPS adapter: the network, its default port weights and the file's metadata."""

    network: BPSNetwork
    omega: list[float]
    config: BPSConfig
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    hint_meaning: str = "sketch"


def _fail(path: os.PathLike | str, problem: str, fix: str) -> AdapterError:
    fix = fix if fix.endswith(".") else fix + "."
    return AdapterError(f"BPS adapter {os.fspath(path)!r}: {problem}. {fix}")


def _read_header(path: str) -> tuple[dict[str, Any], dict[str, str], int]:
    """Return (tensor entries, metadata, data offset) after checking the file's framing."""
    convert = "If it is an official BPS-v1-1 checkpoint (.ckpt/.pth), convert it first: " \
              "python -m bps.convert_official IN.ckpt OUT.safetensors"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, "the file is too short to be a safetensors file", convert)
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                if head[:2] == b"\x80\x02" or head[:2] == b"PK":
                    raise _fail(path, "this is a pickle/zip checkpoint, not a safetensors file", convert)
                if 8 + n > size and n <= _MAX_HEADER:
                    raise _fail(path, f"the file is truncated (header says {n} bytes, file has {size})",
                                "Download or copy the file again")
                raise _fail(path, "this is not a safetensors file", convert)
            raw = f.read(n)
    except OSError as e:
        raise _fail(path, f"cannot read the file ({e.strerror or e})", "Check the path and permissions") from None
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        raise _fail(path, "the safetensors header is corrupt", "Download or copy the file again") from None
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            count = 1
            for d in entry["shape"]:
                count *= d
            ok = entry["dtype"] in _DTYPE_BYTES and end - begin == count * _DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            ok, end = False, 0
        if not ok:
            raise _fail(path, f"tensor {name!r} has a corrupt or unsupported entry in the header",
                        "Download or copy the file again")
        if end > data_len:
            raise _fail(path, f"the file is truncated: tensor {name!r} runs past the end of the file",
                        "Download or copy the file again")
    return header, metadata, 8 + n


def _parse_metadata(path: str, raw: dict[str, str]) -> dict[str, Any]:
    resave = "Re-save the adapter with this pack (bps.save_adapter or the trainer), or convert the official " \
             "checkpoint with python -m bps.convert_official"
    if raw.get("format") != FORMAT:
        raise _fail(path, "the file has no BPS adapter metadata (it is some other safetensors file)", resave)
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except ValueError:
            meta[key] = value
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise _fail(path, f"format_version {version!r} is missing or not a number", resave)
    if version > FORMAT_VERSION:
        raise _fail(path, f"format version {version} is newer than this pack understands ({FORMAT_VERSION})",
                    "Update ComfyUI-BPS")
    if meta.get("base_model") != BASE_MODEL:
        raise _fail(path, f"it was made for base model {meta.get('base_model')!r}, not {BASE_MODEL!r} "
                    f"(Stable Diffusion 1.5)", "Use an adapter trained for SD1.5")
    for key in ("config", "omega"):
        if key not in meta:
            raise _fail(path, f"metadata {key!r} is missing", resave)
    return meta


def read_adapter_metadata(path: os.PathLike | str) -> dict[str, Any]:
    """Validated, JSON-decoded metadata of an adapter file; reads the header only."""
    path = os.fspath(path)
    _, raw, _ = _read_header(path)
    return _parse_metadata(path, raw)


def load_adapter(path: os.PathLike | str, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> Adapter:
    """Load and validate an adapter file.

    Args:
        path: the ``.safetensors`` file.
        device: where the weights go.
        dtype: weight dtype; None keeps the file's.

    Raises:
        AdapterError: naming the file, the problem and the fix.
    """
    path = os.fspath(path)
    header, raw, _ = _read_header(path)
    meta = _parse_metadata(path, raw)
    try:
        config = BPSConfig.from_dict(meta["config"])
    except (ValueError, TypeError) as e:
        raise _fail(path, f"its architecture config is invalid ({e})", "Re-save or re-convert the adapter") from None
    omega = meta["omega"]
    if (not isinstance(omega, list) or len(omega) != config.num_ports
            or not all(isinstance(w, (int, float)) and w == w and abs(w) != float("inf") for w in omega)):
        raise _fail(path, f"its omega must be {config.num_ports} finite numbers, got {omega!r}",
                    "Re-save the adapter with valid port weights")

    with torch.device("meta"):
        network = BPSNetwork(config)
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        raise _fail(path, " and ".join(parts) + " for its config",
                    "The file is incomplete or from another network; re-save or re-convert it")
    for name, shape in expected.items():
        if tuple(header[name]["shape"]) != shape:
            raise _fail(path, f"tensor {name!r} has shape {tuple(header[name]['shape'])}, expected {shape}",
                        "The file does not match its own config; re-save or re-convert it")

    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in expected:
                t = f.get_tensor(name)
                if not torch.isfinite(t).all():
                    raise _fail(path, f"tensor {name!r} contains NaN or infinite values",
                                "The adapter is broken (often a diverged training run); use an earlier checkpoint")
                state[name] = t.to(device=device, dtype=dtype or t.dtype)
    except AdapterError:
        raise
    except Exception as e:  # a safetensors parse error the framing checks did not catch
        raise _fail(path, f"the file cannot be read ({e})", "Download or copy the file again") from None
    network.load_state_dict(state, assign=True)
    network.eval().requires_grad_(False)
    return Adapter(network, [float(w) for w in omega], config, meta, path, str(meta.get("hint_meaning", "")))


def save_adapter(path: os.PathLike | str, network: BPSNetwork, *, omega: Sequence[float] | None = None,
                 dtype: torch.dtype = torch.float16, hint_meaning: str = "sketch",
                 provenance: dict[str, Any] | None = None) -> None:
    """Write an adapter file atomically (a temp file renamed over ``path``).

    Args:
        network: the trained B_phi.
        omega: default port weights (default: the paper's top-heavy weights).
        dtype: storage dtype: float16 (default), bfloat16 or float32.
        hint_meaning: what the condition image is ("sketch", "layout", "segmentation", "style", ...).
        provenance: training facts (base checkpoint, data, steps, ...) stored as JSON.
    """
    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"adapter dtype must be one of {_SAVE_DTYPES}, got {dtype}")
    config = network.config
    omega = list(PAPER_OMEGA if omega is None else omega)
    if len(omega) != config.num_ports:
        raise ValueError(f"omega needs {config.num_ports} weights, got {len(omega)}")
    metadata = {
        "format": FORMAT,
        "format_version": json.dumps(FORMAT_VERSION),
        "base_model": json.dumps(BASE_MODEL),
        "config": json.dumps(config.to_dict()),
        "hint_channels": json.dumps(config.hint_channels),
        "extra_channels": json.dumps(config.extra_channels),
        "hint_meaning": json.dumps(hint_meaning),
        "omega": json.dumps([float(w) for w in omega]),
        "injection": json.dumps(INJECTION_RULE),
    }
    if provenance:
        metadata["provenance"] = json.dumps(provenance, default=str)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in network.state_dict().items()}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
