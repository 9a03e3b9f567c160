"""BPS adapter files: ``.safetensors`` with the network weights and self-describing metadata.

An adapter file holds the state dict of :class:`~bps.network.BPSNetwork` (parameter names as in
the official ``control_model``, minus the parameters the official network never uses) and, in
the safetensors metadata (str -> str, structured values JSON-encoded), everything needed to use
it: format name and version, architecture config, hint channels and what the hint means, base
model family, the default omega of every port, the injection rule, and training provenance.

Loading never unpickles anything. The file's framing (8-byte header length, JSON header, tensor
offsets) is checked by hand first, so a truncated or corrupt file gets a message that says so
instead of a raw parser error, and every problem is an :class:`AdapterError` naming the file,
what is wrong, and the fix. The network is built on the meta device and the tensors read from
the file are assigned to it, so loading a 1.3 GB SD1.5 adapter costs one copy of the weights.
"""

from __future__ import annotations

import json
import math
import os
import stat
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
from .ports import PortMap, port_map
from .unet_shape import UNetShape

FORMAT = "bps-adapter"
#: Newest format this code writes and reads; files with a larger version are refused.
#: Version 2 stores the middle port's zero conv as ``zero_blocks.<N>`` (N = number of input
#: blocks, 12 for SD1.5), its official name; version 1 stored it as ``middle_block.2``. Both load.
FORMAT_VERSION = 2
#: ``base_model`` of files that record no UNet shape: they were all made for the SD1.5 family.
BASE_MODEL = "sd15"
INJECTION_RULE = ("the residual of port i times omega_i is added to the output of every ResBlock and every "
                  "SpatialTransformer of the port's UNet block; Downsample/Upsample outputs get nothing")
HINT_RANGE = "[0, 1], channels first, {downscale}x the latent size"

#: Metadata keys every adapter must have (besides "format"), all JSON-encoded.
REQUIRED_METADATA = ("format_version", "base_model", "config", "omega", "hint_meaning")

_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
_SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEADER = 100 * 2 ** 20  # the safetensors library's own limit
_CONVERT = ("If it is an official BPS-v1-1 checkpoint (.ckpt/.pth), convert it first: "
            "python -m bps.convert_official IN.ckpt OUT.safetensors")
_REDOWNLOAD = "Download or copy the file again"
_RESAVE = ("Re-save the adapter with this pack (bps.save_adapter or the trainer), or convert an official "
           "checkpoint with python -m bps.convert_official")


@dataclass
class Adapter:
    """A loaded BPS adapter.

    Attributes:
        network: B_phi in eval mode, gradients off.
        omega: default weight of every port (``config.num_ports`` floats, port order).
        config: the network's architecture.
        metadata: the file's metadata, JSON values decoded.
        path: the file it was loaded from (None for adapters built in memory).
        hint_meaning: what the condition image is: "sketch", "layout", "segmentation", "style", ...
        unet_shape: the UNet the adapter was trained for (None: the one its network's widths
            give in SD1.5's layout, which for a full-width network is SD1.5).
    """

    network: BPSNetwork
    omega: list[float]
    config: BPSConfig
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    hint_meaning: str = "sketch"
    unet_shape: UNetShape | None = None

    def __post_init__(self) -> None:
        if self.unet_shape is None:
            self.unet_shape = self.config.shape_without_record()

    @property
    def ports(self) -> PortMap:
        """The ports of the UNet this adapter steers, in its omega's order."""
        return port_map(self.unet_shape)

    @property
    def condition(self) -> dict[str, Any] | None:
        """The preprocessor its conditions were made with (``{"kind", "params", "version"}``, see
        :class:`bps.condition_maps.ConditionSpec`), when the trainer made them from images; else None."""
        value = self.metadata.get("condition")
        return value if isinstance(value, dict) else None


def _fail(path: os.PathLike | str, problem: str, fix: str) -> AdapterError:
    fix = fix if fix.endswith(".") else fix + "."
    return AdapterError(f"BPS adapter {os.fspath(path)!r}: {problem}. {fix}")


def _looks_like_pickle(head: bytes) -> str | None:
    """Name the checkpoint kind if the first bytes are those of a pickle or a torch.save zip."""
    if head[:4] == b"PK\x03\x04":
        return "a zip checkpoint written by torch.save (.ckpt/.pth)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle checkpoint (.ckpt/.pth)"
    return None


def _read_header(path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Return (tensor entries, raw metadata or None) after checking the file's framing.

    Reads only the header: the 8-byte little-endian header length and the JSON header.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            kind = _looks_like_pickle(head)
            if kind:
                raise _fail(path, f"this is {kind}, not a safetensors file; it is never unpickled", _CONVERT)
            if len(head) < 8:
                raise _fail(path, f"the file is only {size} bytes, too short to be a safetensors file",
                            f"{_REDOWNLOAD}. {_CONVERT}")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n < 2:
                raise _fail(path, "this is not a safetensors file (its first 8 bytes are not a header length)",
                            _CONVERT)
            if 8 + n > size:
                raise _fail(path, f"the file is truncated: its header says {n} bytes but the file has only "
                                  f"{size - 8} after the length field", _REDOWNLOAD)
            raw = f.read(n)
    except OSError as e:
        raise _fail(path, f"cannot read the file ({e.strerror or e})", "Check the path and its permissions") from None
    if not raw.lstrip(b" ").startswith(b"{"):
        raise _fail(path, "this is not a safetensors file (no JSON header)", _CONVERT)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except ValueError:  # includes UnicodeDecodeError
        raise _fail(path, "the safetensors header is corrupt (not valid JSON)", _REDOWNLOAD) from None
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(v, str) for v in metadata.values())):
        raise _fail(path, "the safetensors metadata is garbled (not a string-to-string map)", _RESAVE)

    data_len = size - 8 - n
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            shape = entry["shape"]
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= begin <= end:
                raise ValueError
            ok = entry["dtype"] in _DTYPE_BYTES and end - begin == math.prod(shape) * _DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            dtype = entry.get("dtype") if isinstance(entry, dict) else None
            if dtype is not None and dtype not in _DTYPE_BYTES:
                raise _fail(path, f"tensor {name!r} has dtype {dtype}; adapters store F16, BF16 or F32",
                            _RESAVE)
            raise _fail(path, f"the header entry of tensor {name!r} is corrupt", _REDOWNLOAD)
        if end > data_len:
            raise _fail(path, f"the file is truncated: tensor {name!r} ends at byte {end} of the data but the file "
                              f"holds only {data_len} bytes of data", _REDOWNLOAD)
    return header, metadata


def _parse_metadata(path: str, raw: dict[str, str] | None) -> dict[str, Any]:
    """Decode and validate the metadata; raise AdapterError for a non-BPS, garbled or foreign file."""
    if not raw:
        raise _fail(path, "the file has no metadata, so it is not a BPS adapter (maybe another kind of model, "
                          "or weights saved without this pack)", _RESAVE)
    if raw.get("format") != FORMAT:
        raise _fail(path, f"its metadata says format {raw.get('format')!r}, not {FORMAT!r}: it is not a BPS adapter",
                    _RESAVE)
    meta: dict[str, Any] = {"format": FORMAT}
    for key, value in raw.items():
        if key == "format":
            continue
        try:
            meta[key] = json.loads(value)
        except ValueError:
            if key in REQUIRED_METADATA:
                raise _fail(path, f"metadata {key!r} is garbled (not JSON: {value[:60]!r})", _RESAVE) from None
            meta[key] = value  # a free-text key added by another tool; keep it as text
    version = meta.get("format_version")
    if version is None:
        raise _fail(path, "metadata 'format_version' is missing", _RESAVE)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(path, f"metadata 'format_version' is {version!r}, not a version number", _RESAVE)
    if version > FORMAT_VERSION:
        raise _fail(path, f"its format version {version} is newer than this pack understands "
                          f"(up to {FORMAT_VERSION})", "Update ComfyUI-BPS to load it")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise _fail(path, f"metadata {', '.join(repr(k) for k in missing)} {'is' if len(missing) == 1 else 'are'} "
                          f"missing", _RESAVE)
    if "unet" not in meta and meta["base_model"] != BASE_MODEL:
        raise _fail(path, f"it was made for base model {meta['base_model']!r} but records no UNet shape, so this "
                          f"pack cannot tell which UNet it steers",
                    "Use an adapter trained for SD1.5, or re-save it with this pack's trainer")
    if not isinstance(meta["hint_meaning"], str):
        raise _fail(path, f"metadata 'hint_meaning' is {meta['hint_meaning']!r}, not text", _RESAVE)
    return meta


def _metadata_object(path: str, meta: dict[str, Any], key: str, parse, what: str) -> Any:
    """``parse(meta[key])`` for a metadata entry that must be a JSON object; AdapterError naming ``what``."""
    try:
        if not isinstance(meta[key], dict):
            raise ValueError(f"{meta[key]!r} is not a JSON object")
        return parse(meta[key])
    except (ValueError, TypeError) as e:
        raise _fail(path, f"its {what} is invalid ({e})", _RESAVE) from None


def _config_and_omega(path: str, meta: dict[str, Any]) -> tuple[BPSConfig, list[float], UNetShape]:
    config = _metadata_object(path, meta, "config", BPSConfig.from_dict, "architecture config")
    if "unet" in meta:
        shape = _metadata_object(path, meta, "unet", UNetShape.from_dict, "UNet shape")
        if meta["base_model"] != shape.family_key:
            raise _fail(path, f"its metadata contradicts itself: base model {meta['base_model']!r} but the UNet of "
                              f"{shape.family}", _RESAVE)
        if not config.fits(shape):
            raise _fail(path, f"its network (model_channels {config.model_channels}, channel_mult "
                              f"{list(config.channel_mult)}) does not fit the UNet it records, {shape.describe()}",
                        _RESAVE)
    else:
        shape = config.shape_without_record()
    omega = meta["omega"]
    if (not isinstance(omega, list) or len(omega) != config.num_ports
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in omega)):
        raise _fail(path, f"its omega must be {config.num_ports} finite numbers (one per port), got {omega!r}",
                    _RESAVE)
    return config, [float(w) for w in omega], shape


def file_tensor_names(network: BPSNetwork, version: int) -> dict[str, str]:
    """State-dict name of each tensor of ``network`` -> its name in an adapter file of format ``version``.

    Identity for the current format. Version 1 files name the middle port's zero conv
    ``middle_block.2.*``; everything else has kept its name.
    """
    config, names = network.config, list(network.state_dict())
    if version >= 2:
        return {n: n for n in names}
    middle = f"zero_blocks.{config.middle_zero_block}."
    return {n: "middle_block.2." + n[len(middle):] if n.startswith(middle) else n for n in names}


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or infinity (fast path: one float32-accumulated sum)."""
    # One float32-accumulated reduction is several times faster than isfinite().all() on half
    # tensors; a non-finite sum is either a real NaN/Inf or an overflow, which the exact check tells apart.
    if math.isfinite(float(torch.sum(t, dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def read_adapter_metadata(path: os.PathLike | str) -> dict[str, Any]:
    """Return the validated, JSON-decoded metadata of an adapter file, reading only its header.

    Raises:
        AdapterError: the file is not a readable BPS adapter for SD1.5 (message names the fix).
    """
    path = os.fspath(path)
    _, raw = _read_header(path)
    meta = _parse_metadata(path, raw)
    _config_and_omega(path, meta)
    return meta


def load_adapter(path: os.PathLike | str, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> Adapter:
    """Load and validate an adapter file.

    Args:
        path: the ``.safetensors`` adapter file.
        device: where the weights go.
        dtype: weight dtype (float32, float16 or bfloat16); None keeps the file's.

    Returns:
        The :class:`Adapter`, its network in eval mode with gradients off.

    Raises:
        AdapterError: the file is not a safetensors file, is truncated or corrupt, lacks or
            garbles its metadata, is of a newer format version or for another base model, or
            its tensors are missing, unexpected, misshapen or not finite. The message names the
            file, the problem and the fix.
    """
    if dtype is not None and dtype not in _SAVE_DTYPES:
        raise ValueError(f"adapter dtype must be one of {', '.join(map(str, _SAVE_DTYPES))}, got {dtype}")
    path = os.fspath(path)
    header, raw = _read_header(path)
    meta = _parse_metadata(path, raw)
    config, omega, unet_shape = _config_and_omega(path, meta)

    # Built on the meta device: no memory, no init; the file's tensors are assigned below.
    with torch.device("meta"):
        network = BPSNetwork(config)
    # Keyed by the name in the file (older formats named a few tensors differently).
    in_file = file_tensor_names(network, meta["format_version"])
    expected = {in_file[k]: tuple(v.shape) for k, v in network.state_dict().items()}
    param_name = {f: n for n, f in in_file.items()}
    missing = [k for k in expected if k not in header]
    unexpected = [k for k in header if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s) (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {', '.join(unexpected[:3])})")
        raise _fail(path, " and ".join(parts) + " for the architecture in its metadata",
                    "The file is incomplete or holds another network; re-save or re-convert it")
    for name, shape in expected.items():
        if tuple(header[name]["shape"]) != shape:
            raise _fail(path, f"tensor {name!r} has shape {tuple(header[name]['shape'])}, expected {shape} for the "
                              f"architecture in its metadata", "The file is inconsistent; re-save or re-convert it")
    if dtype is None:
        file_dtypes = {header[name]["dtype"] for name in expected}
        # A uniform file keeps its dtype; a mixed one (not written by this pack) computes in float32.
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[file_dtypes.pop()] \
            if len(file_dtypes) == 1 else torch.float32

    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in expected:
                t = f.get_tensor(name)
                if not all_finite(t):
                    raise _fail(path, f"tensor {name!r} contains NaN or infinite values",
                                "The adapter is broken (often a diverged training run); use an earlier checkpoint "
                                "or retrain with a lower learning rate")
                state[param_name[name]] = t.to(device=device, dtype=dtype)  # no copy when already right
    except AdapterError:
        raise
    except Exception as e:  # a safetensors parse error the framing checks did not catch
        raise _fail(path, f"the file cannot be read ({e})", _REDOWNLOAD) from None
    network.load_state_dict(state, assign=True)
    network.eval().requires_grad_(False)
    return Adapter(network, omega, config, meta, path, meta["hint_meaning"], unet_shape)


def _umask() -> int:
    # os.umask() can only be read by setting it, which races with other threads; Linux exposes it.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def save_adapter(path: os.PathLike | str, network: BPSNetwork, *, omega: Sequence[float] | None = None,
                 dtype: torch.dtype = torch.float16, hint_meaning: str = "sketch",
                 provenance: dict[str, Any] | None = None, condition: dict[str, Any] | None = None,
                 unet: UNetShape | None = None) -> None:
    """Write an adapter file atomically: a temp file in the same folder, renamed over ``path``.

    If anything fails the previous file at ``path`` (if any) is untouched and no temp file stays.

    Args:
        path: the ``.safetensors`` file to write.
        network: the trained B_phi (any device and dtype).
        omega: default port weights (default: the UNet's top-heavy defaults, the paper's for SD1.5).
        dtype: storage dtype: float16 (default), bfloat16 or float32.
        hint_meaning: what the condition image is ("sketch", "layout", "segmentation", "style", or free text).
        provenance: training facts (base checkpoint, data, steps, ...), stored as JSON.
        condition: the preprocessor that made the training conditions from the images
            (:meth:`bps.condition_maps.ConditionSpec.to_dict`), stored as JSON under "condition"
            so the "BPS Condition from Image" node can make the same condition at sampling time.
        unet: the UNet the adapter steers (default: SD1.5's layout at the network's widths, i.e.
            SD1.5 for a full-width network); recorded so that loaders refuse other UNets.

    Raises:
        ValueError: bad arguments (path suffix, dtype, omega, hint_meaning, a network that does
            not fit ``unet``).
        AdapterError: the network holds NaN/Inf values, so the file could not be loaded.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"adapter files are .safetensors; got {str(path)!r}. Name the file *.safetensors")
    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"adapter dtype must be one of {', '.join(map(str, _SAVE_DTYPES))}, got {dtype}")
    config = network.config
    unet = unet or config.shape_without_record()
    if not config.fits(unet):
        raise ValueError(f"the network (model_channels {config.model_channels}, channel_mult "
                         f"{list(config.channel_mult)}) does not fit {unet.describe()}; build it with "
                         f"BPSConfig.for_unet(shape)")
    ports = port_map(unet)
    omega = [float(w) for w in (ports.default_omega if omega is None else omega)]
    if len(omega) != config.num_ports or not all(math.isfinite(w) for w in omega):
        raise ValueError(f"omega needs {config.num_ports} finite weights (one per port), got {omega}")
    if not isinstance(hint_meaning, str) or not hint_meaning.strip():
        raise ValueError(f"hint_meaning must be a non-empty text such as 'sketch', got {hint_meaning!r}")

    metadata = {
        "format": FORMAT,
        "format_version": json.dumps(FORMAT_VERSION),
        "base_model": json.dumps(unet.family_key),
        "unet": json.dumps(unet.to_dict()),
        "config": json.dumps(config.to_dict()),
        "hint_channels": json.dumps(config.hint_channels),
        "extra_channels": json.dumps(config.extra_channels),
        "hint_meaning": json.dumps(hint_meaning.strip()),
        "hint_range": json.dumps(HINT_RANGE.format(downscale=config.downscale)),
        "omega": json.dumps(omega),
        "injection": json.dumps(INJECTION_RULE),
    }
    metadata["omega_ports"] = json.dumps(list(ports.names))
    if provenance:
        metadata["provenance"] = json.dumps(provenance, default=str)
    if condition:
        metadata["condition"] = json.dumps(condition, sort_keys=True)

    tensors = {}
    for name, value in network.state_dict().items():
        value = value.detach().to("cpu", dtype).contiguous()
        if not all_finite(value):
            raise AdapterError(f"cannot save BPS adapter {str(path)!r}: tensor {name!r} contains NaN or infinite "
                               f"values (in {dtype}). The network diverged (or overflows {dtype}); save an "
                               f"earlier checkpoint" + (" or use dtype=torch.float32" if dtype != torch.float32
                                                        else ""))
        tensors[name] = value

    # Keep the mode of the file being replaced; a new file gets the usual umask-based mode
    # (mkstemp would leave it owner-only).
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
