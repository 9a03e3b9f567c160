"""Convert an official BPS-v1-1 checkpoint into this pack's adapter format.

    python -m bps.convert_official IN.ckpt OUT.safetensors [--dtype fp16|bf16|fp32]
                                   [--hint-meaning sketch|layout|segmentation|style|TEXT] [--overwrite]

IN is a PyTorch Lightning training checkpoint whose ``state_dict`` holds
``model.diffusion_model.control_model.*`` (possibly beside the whole SD model and the optimizer
state), a bare ``control_model`` state dict (keys without prefix), or a ``.safetensors`` of
either. ``.ckpt``/``.pth`` files are read with ``torch.load(weights_only=True)`` only: a
checkpoint that needs arbitrary unpickling is refused, never loaded unsafely.

The four configurations of the official release are recognised by their first conv's inputs:

    first conv  official config          condition image
    64          bps_sd15_pidinet.yaml    1 channel (sketch), pixel-unshuffled by 8
    192         bps_sd15_layout.yaml     3 channels (layout, segmentation), pixel-unshuffled by 8
    256         bps_sd15_style.yaml      RGB + 1 extra map, each pixel-unshuffled by 8 (BPS_forstyle)
    24          bps_sd15_style2.yaml     24 channels at latent resolution, no unshuffle (unshuffle_dim 1)

What changes on the way: the official ``res_weights`` (fixed per-block scalars) become the
adapter's default omega, and the zero convs of conv_in and the Downsample blocks
(``zero_blocks.{0,3,6,9}``) and ``res_weights`` 0 and 12, which the official forward never uses,
are dropped. Every other tensor keeps its name and is copied unchanged (then stored in the chosen
dtype).
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
from dataclasses import dataclass, field

import torch

from .adapter_file import all_finite, save_adapter
from .errors import AdapterError
from .network import BPSConfig, BPSNetwork
from .ports import NUM_PORTS, PORTS

#: Where the control model lives in an official Lightning checkpoint.
PREFIX = "model.diffusion_model.control_model."
#: Prefixes tried in order; a state dict with none of them must be a bare control_model.
PREFIXES = (PREFIX, "diffusion_model.control_model.", "control_model.")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

_TOP_HEAVY = (16.0, 16.0, 1.0, 8.0, 8.0, 1.0, 4.0, 4.0, 1.0, 2.0, 2.0, 1.0, 16.0)


@dataclass(frozen=True)
class OfficialVariant:
    """One B_phi configuration of the official release.

    Attributes:
        yaml: the official config file (``models/<yaml>``).
        hint: the :class:`BPSConfig` fields that describe its condition image.
        meaning: hint meaning stored in the adapter unless ``--hint-meaning`` says otherwise.
        condition: what the condition image is, in words (for reports and messages).
        yaml_res_weights: the yaml's ``res_weights`` (the official network holds ``[1] + these``);
            the default omega when a checkpoint carries no ``res_weights`` entries.
    """

    yaml: str
    hint: dict
    meaning: str
    condition: str
    yaml_res_weights: tuple[float, ...]


#: The official configurations, by the input channels of their first conv.
OFFICIAL_VARIANTS: dict[int, OfficialVariant] = {
    64: OfficialVariant("bps_sd15_pidinet.yaml", {"hint_channels": 1}, "sketch",
                        "a 1-channel sketch (edges), pixel-unshuffled by 8", _TOP_HEAVY),
    192: OfficialVariant("bps_sd15_layout.yaml", {"hint_channels": 3}, "layout",
                         "a 3-channel layout/segmentation image, pixel-unshuffled by 8", (1.0,) * 13),
    256: OfficialVariant("bps_sd15_style.yaml", {"hint_channels": 3, "extra_channels": 1, "extra_downscale": 8},
                         "style", "RGB plus one extra map, each pixel-unshuffled by 8 (BPS_forstyle)", _TOP_HEAVY),
    24: OfficialVariant("bps_sd15_style2.yaml", {"hint_channels": 24, "downscale": 1}, "style2",
                        "a 24-channel map at latent resolution, not unshuffled (unshuffle_dim 1)", _TOP_HEAVY),
}

_DROP_ZERO = "zero conv of conv_in/a Downsample block: the official network never uses it"
_DROP_RES = "port weight -> omega of port {port} = {w:g}, stored in the adapter's metadata"
_DROP_RES_UNUSED = "scalar weight the official network never uses"


@dataclass
class ConversionReport:
    """What a conversion kept, dropped and inferred; ``str(report)`` is the CLI's printout."""

    config: BPSConfig
    omega: list[float]
    kept: int
    kept_numbers: int = 0
    dropped: dict[str, str] = field(default_factory=dict)  # key -> why
    ignored: int = 0  # checkpoint entries outside the control model (SD model, optimizer, ...)
    omega_source: str = "res_weights"
    hint_meaning: str = ""
    dtype: str = ""
    output: str = ""
    variant: OfficialVariant | None = None

    def __str__(self) -> str:
        cfg = self.config
        hint = f"{cfg.hint_channels} channel(s)" + (f" + {cfg.extra_channels} extra map at factor "
                                                   f"{cfg.extra_downscale}" if cfg.extra_channels else "")
        if self.variant is not None:
            hint = f"{self.variant.condition} (official {self.variant.yaml})"
        names = [p.name for p in PORTS] if len(self.omega) == NUM_PORTS else [str(i) for i in range(len(self.omega))]
        lines = [f"wrote {self.output} ({self.dtype})" if self.output else "converted",
                 f"inferred config: {cfg.to_dict()}",
                 f"hint: {hint}, meaning {self.hint_meaning!r}",
                 *([] if cfg.takes_image_hint else
                   [f"note: {cfg.image_hint_problem()}"]),
                 f"kept {self.kept} tensors ({self.kept_numbers:,} numbers), names unchanged",
                 f"omega (from {self.omega_source}): " + ", ".join(f"{n}={w:g}" for n, w in zip(names, self.omega)),
                 f"dropped {len(self.dropped)} tensors:"]
        lines += [f"  {k}: {why}" for k, why in sorted(self.dropped.items(), key=lambda kv: _natural(kv[0]))]
        if self.ignored:
            lines.append(f"ignored {self.ignored} other state-dict entries (the frozen SD model: UNet, VAE, "
                         f"text encoder)")
        return "\n".join(lines)


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def split_control_model(sd: dict, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], int]:
    """Return (control_model tensors without prefix, number of other entries ignored).

    Accepts a Lightning checkpoint ({"state_dict": ...}), a full-model state dict, or a bare
    control_model state dict.
    """
    if isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    for prefix in PREFIXES:
        control = {k[len(prefix):]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(prefix)}
        if control:
            return control, len(sd) - len(control)
    if "input_blocks.0.weight" in sd:
        control = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        return control, len(sd) - len(control)
    raise AdapterError(f"{source!r} holds no BPS control model: no '{PREFIX}*' keys and no bare "
                       f"'input_blocks.0.weight'. Pass an official BPS-v1-1 training checkpoint or its "
                       f"control_model state dict")


def _shape(control: dict, key: str, source: str) -> tuple[int, ...]:
    value = control.get(key)
    if not isinstance(value, torch.Tensor):
        raise AdapterError(f"{source!r} lacks the tensor {key!r} of the BPS control model; the checkpoint is "
                           f"incomplete or not from BPS-v1-1")
    return tuple(value.shape)


def infer_config(control: dict[str, torch.Tensor], source: str = "checkpoint") -> BPSConfig:
    """Infer the architecture of an official control_model from its tensor shapes."""
    out_ch, in_ch, *_ = _shape(control, "input_blocks.0.weight", source)
    variant = OFFICIAL_VARIANTS.get(in_ch)
    if variant is None:
        known = "; ".join(f"{n} ({v.yaml}: {v.condition})" for n, v in OFFICIAL_VARIANTS.items())
        raise AdapterError(f"{source!r}: the first conv takes {in_ch} channels; the official configurations take "
                           f"{known}. This checkpoint is not a supported BPS-v1-1 configuration")
    blocks = sorted({int(k.split(".")[1]) for k in control
                     if k.startswith("input_blocks.") and k.split(".")[1].isdigit()})
    downsamples = [b for b in blocks if f"input_blocks.{b}.op.weight" in control]
    resblocks = [b for b in blocks if f"input_blocks.{b}.in_layers.2.weight" in control]
    levels = len(downsamples) + 1
    if not resblocks or len(resblocks) % levels:
        raise AdapterError(f"{source!r}: cannot infer the encoder layout ({len(resblocks)} ResBlocks, "
                           f"{len(downsamples)} Downsamples); the checkpoint is incomplete or not from BPS-v1-1")
    per_level = len(resblocks) // levels
    widths = [_shape(control, f"input_blocks.{b}.in_layers.2.weight", source)[0] for b in resblocks[::per_level]]
    if any(w % out_ch for w in widths):
        raise AdapterError(f"{source!r}: encoder widths {widths} are not multiples of the first width {out_ch}")
    emb_dim = _shape(control, f"input_blocks.{resblocks[0]}.emb_layers.1.weight", source)[1]
    try:
        return BPSConfig(**variant.hint, model_channels=out_ch, channel_mult=tuple(w // out_ch for w in widths),
                         num_res_blocks=per_level, time_embed_dim=emb_dim)
    except ValueError as e:
        raise AdapterError(f"{source!r}: the inferred architecture is invalid ({e})") from None


def _encoder_port_blocks(config: BPSConfig) -> list[int]:
    """Official input-block numbers of the encoder ResBlocks, in port order (1,2,4,5,7,8,10,11 for SD1.5)."""
    blocks, n = [], 1
    for level in range(len(config.channel_mult)):
        for _ in range(config.num_res_blocks):
            blocks.append(n)
            n += 1
        if level != len(config.channel_mult) - 1:
            n += 1  # the Downsample
    return blocks


def fallback_res_weights(config: BPSConfig) -> dict[int, float]:
    """The ``res_weights`` an official network of ``config`` starts with: ``[1] + the yaml's``.

    Used when a checkpoint carries no ``res_weights`` (the official code always saves them). For a
    block layout other than SD1.5's 12 input blocks, which no official yaml describes, every weight is 1.
    """
    variant = OFFICIAL_VARIANTS.get(config.in_channels)
    n = config.num_input_blocks + 2
    if variant is None or len(variant.yaml_res_weights) + 1 != n:
        return {i: 1.0 for i in range(n)}
    return dict(enumerate((1.0, *variant.yaml_res_weights)))


def convert_official_state_dict(sd: dict, source: str = "checkpoint"
                                ) -> tuple[dict[str, torch.Tensor], list[float], BPSConfig, dict[str, str]]:
    """Map an official state dict to ``(our state dict, omega, config, dropped key -> reason)``.

    ``sd`` is a Lightning checkpoint, a full-model state dict or a bare control_model state dict.
    Kept tensors are the official ones, unchanged (same objects). Omega: encoder port i takes
    ``res_weights[block of port i]``, the middle port the last res_weights entry, decoder ports 1.0;
    without res_weights, those of the official configuration's yaml (:func:`fallback_res_weights`).

    Raises:
        AdapterError: not a BPS control model, unknown layout, missing/unknown/misshapen
            tensors, or NaN/Inf values.
    """
    control, _ = split_control_model(sd, source)
    config = infer_config(control, source)
    with torch.device("meta"):
        expected = BPSNetwork(config).state_dict()
    encoder_blocks = _encoder_port_blocks(config)
    n_input_blocks = config.num_input_blocks

    # res_weights: one per input block, one unused, and the last for the middle block.
    res: dict[int, float] = {}
    for key, value in control.items():
        if key.startswith("res_weights."):
            index = key.split(".", 1)[1]
            if not index.isdigit() or not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise AdapterError(f"{source!r}: {key} is not a scalar res_weights entry; not a BPS-v1-1 checkpoint")
            res[int(index)] = float(value)
    if res and sorted(res) != list(range(n_input_blocks + 2)):
        raise AdapterError(f"{source!r}: found res_weights {sorted(res)}, expected 0..{n_input_blocks + 1} "
                           f"({n_input_blocks} input blocks + 2); the checkpoint is incomplete or not from BPS-v1-1")
    bad = [f"res_weights.{i}={w}" for i, w in res.items() if not math.isfinite(w)]
    if bad:
        raise AdapterError(f"{source!r}: non-finite port weights {', '.join(bad)}; the checkpoint is broken")

    n_enc, n_ports = len(encoder_blocks), config.num_ports
    port_names = [p.name for p in PORTS] if n_ports == NUM_PORTS else [str(i) for i in range(n_ports)]
    weights = res or fallback_res_weights(config)
    omega = [weights[b] for b in encoder_blocks] + [weights[max(weights)]] + [1.0] * (n_ports - n_enc - 1)
    used = {b: i for i, b in enumerate(encoder_blocks)} | {max(weights): n_enc}

    state: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    ported = set(encoder_blocks)
    for key, value in control.items():
        if key in expected:
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(expected[key].shape):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise AdapterError(f"{source!r}: {key} has shape {got}, expected {tuple(expected[key].shape)} for "
                                   f"the inferred architecture {config.to_dict()}; the checkpoint is inconsistent")
            if not value.is_floating_point():
                raise AdapterError(f"{source!r}: {key} holds {value.dtype} values, not floating point")
            if not all_finite(value):
                raise AdapterError(f"{source!r}: {key} contains NaN or infinite values; the checkpoint is broken "
                                   f"(a diverged training run?). Use another checkpoint")
            state[key] = value
        elif key.startswith("res_weights."):
            i = int(key.split(".")[1])
            dropped[key] = (_DROP_RES.format(port=port_names[used[i]], w=res[i]) if i in used
                            else _DROP_RES_UNUSED)
        elif (key.startswith("zero_blocks.") and key.split(".")[1].isdigit()
              and int(key.split(".")[1]) < n_input_blocks and int(key.split(".")[1]) not in ported
              and key.split(".", 2)[2] in ("weight", "bias")):
            dropped[key] = _DROP_ZERO
        else:
            unknown.append(key)
    if unknown:
        raise AdapterError(f"{source!r}: {len(unknown)} control_model tensor(s) this converter does not know "
                           f"(e.g. {', '.join(sorted(unknown, key=_natural)[:3])}); the checkpoint is not the "
                           f"BPS-v1-1 architecture, so converting it would change what the network computes")
    missing = [k for k in expected if k not in state]
    if missing:
        raise AdapterError(f"{source!r} lacks {len(missing)} BPS tensor(s) (e.g. {', '.join(missing[:3])}); the "
                           f"checkpoint is incomplete")
    return state, omega, config, dropped


def _refusal_reason(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for ln in lines:  # torch names the offending global on one of its lines
        if "GLOBAL" in ln or "Unsupported" in ln:
            return ln.split(". Please")[0].removeprefix("WeightsUnpickler error: ")
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def read_checkpoint(path: str) -> dict:
    """Read a ``.ckpt``/``.pth`` with ``torch.load(weights_only=True)``, or a ``.safetensors``.

    Never unpickles arbitrary objects. From a ``.safetensors``, only the control-model tensors
    are read. Raises AdapterError for missing, unreadable, corrupt or unsafe files.
    """
    if not os.path.isfile(path):
        raise AdapterError(f"{path!r} does not exist or is not a file. Check the path of the official checkpoint")
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                keys = list(f.keys())
                wanted = [k for k in keys if any(k.startswith(p) for p in PREFIXES)] or keys
                return {k: f.get_tensor(k) for k in wanted}
        except Exception as e:
            raise AdapterError(f"cannot read {path!r} as a safetensors file ({e}). The file is corrupt or truncated; "
                               f"download or copy it again") from None
    try:
        try:
            # mmap: a full training checkpoint (several GB) is paged in only where read.
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise AdapterError(
            f"{path!r} cannot be read safely: torch.load(weights_only=True) refused it ({_refusal_reason(e)}). "
            f"The checkpoint pickles Python objects besides tensors, and unpickling them could run arbitrary code, "
            f"so this converter never does. If you trust the file, re-save just its weights in a separate Python "
            f"session (torch.save(ckpt['state_dict'], 'weights.ckpt')) and convert that") from None
    except Exception as e:
        raise AdapterError(f"cannot read {path!r} as a PyTorch checkpoint ({_refusal_reason(e)}). The file is "
                           f"corrupt or truncated, or not a checkpoint; download or copy it again") from None
    if not isinstance(sd, dict):
        raise AdapterError(f"{path!r} holds a {type(sd).__name__}, not a checkpoint dict or state dict")
    return sd


def _provenance(path: str, ckpt: dict) -> dict:
    facts = {"source": "official BPS-v1-1 checkpoint", "converted_from": os.path.basename(path),
             "converter": "python -m bps.convert_official"}
    for key in ("epoch", "global_step"):
        if isinstance(ckpt.get(key), int):
            facts[key] = ckpt[key]
    return facts


def convert_official(in_path: str, out_path: str, *, dtype: torch.dtype = torch.float16,
                     hint_meaning: str | None = None, overwrite: bool = False) -> ConversionReport:
    """Convert the official checkpoint ``in_path`` to an adapter file ``out_path``.

    Args:
        dtype: storage dtype of the adapter (float16 default, bfloat16, float32).
        hint_meaning: what the hint is; None guesses from the channels (sketch, layout, style).
        overwrite: replace an existing ``out_path``.

    Returns:
        The :class:`ConversionReport`.

    Raises:
        AdapterError: unreadable/unsafe/unsupported input, or an output that exists or is not .safetensors.
    """
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    if not out_path.lower().endswith(".safetensors"):
        raise AdapterError(f"output {out_path!r} must be a .safetensors file. Name it e.g. bps_sketch.safetensors")
    if os.path.abspath(out_path) == os.path.abspath(in_path):
        raise AdapterError(f"output {out_path!r} is the input file. Choose another output name")
    if os.path.exists(out_path) and not overwrite:
        raise AdapterError(f"output {out_path!r} already exists. Pass --overwrite (overwrite=True) to replace it")
    ckpt = read_checkpoint(in_path)
    _, ignored = split_control_model(ckpt, in_path)
    state, omega, config, dropped = convert_official_state_dict(ckpt, in_path)
    variant = OFFICIAL_VARIANTS[config.in_channels]
    if hint_meaning is None:
        hint_meaning = variant.meaning
    # The official tensors are assigned, not copied; save_adapter converts them one by one.
    with torch.device("meta"):
        network = BPSNetwork(config)
    network.load_state_dict(state, assign=True)
    save_adapter(out_path, network, omega=omega, dtype=dtype, hint_meaning=hint_meaning,
                 provenance=_provenance(in_path, ckpt))
    has_res = any(k.startswith("res_weights.") for k in dropped)
    omega_source = ("res_weights" if has_res else
                    f"{variant.yaml}'s res_weights, since the checkpoint has none"
                    if config.num_input_blocks + 1 == len(variant.yaml_res_weights) else
                    "1 everywhere, since the checkpoint has no res_weights")
    return ConversionReport(config, omega, len(state), sum(v.numel() for v in state.values()), dropped, ignored,
                            omega_source, hint_meaning, str(dtype).replace("torch.", ""), out_path, variant)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 refused, 2 bad arguments)."""
    parser = argparse.ArgumentParser(prog="python -m bps.convert_official", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="official checkpoint (.ckpt, .pth or .safetensors)")
    parser.add_argument("output", help="adapter file to write (.safetensors)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16", help="storage dtype (default: fp16)")
    parser.add_argument("--hint-meaning", default=None,
                        help="what the condition image is: sketch, layout, segmentation, style or free text "
                             "(default: sketch for 1 channel, layout for 3, style for 3 + extra map)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    if args.hint_meaning is not None and not args.hint_meaning.strip():
        parser.error("--hint-meaning must not be empty")
    try:
        report = convert_official(args.input, args.output, dtype=DTYPES[args.dtype],
                                  hint_meaning=args.hint_meaning, overwrite=args.overwrite)
    except AdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. output folder missing or not writable
        print(f"error: cannot write {args.output!r} ({e.strerror or e}). Check the output folder exists and is "
              f"writable", file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
