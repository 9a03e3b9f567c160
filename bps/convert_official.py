"""Convert an official BPS-v1-1 checkpoint into this pack's adapter format.

    python -m bps.convert_official IN.ckpt OUT.safetensors [--dtype fp16|bf16|fp32] [--hint-meaning sketch]

IN is a PyTorch Lightning training checkpoint whose ``state_dict`` holds
``model.diffusion_model.control_model.*`` (possibly beside the whole SD model), a bare
``control_model`` state dict, or a ``.safetensors`` of either. ``.ckpt``/``.pth`` files are read
with ``torch.load(weights_only=True)`` only: a checkpoint that needs arbitrary unpickling is
refused, never loaded unsafely.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

import torch

from .adapter_file import save_adapter
from .errors import AdapterError
from .network import BPSConfig, BPSNetwork
from .ports import PORTS

PREFIX = "model.diffusion_model.control_model."
#: Official conv_in input channels -> (hint channels, extra-map channels).
HINT_LAYOUTS = {64: (1, 0), 192: (3, 0), 256: (3, 1)}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class ConversionReport:
    """What a conversion kept, dropped and inferred."""

    config: BPSConfig
    omega: list[float]
    kept: int
    dropped: dict[str, str] = field(default_factory=dict)  # key -> why

    def __str__(self) -> str:
        lines = [f"hint channels: {self.config.hint_channels}"
                 + (f" + {self.config.extra_channels} extra map" if self.config.extra_channels else ""),
                 f"tensors kept: {self.kept}",
                 "omega: " + ", ".join(f"{p.name}={w:g}" for p, w in zip(PORTS, self.omega)),
                 f"dropped {len(self.dropped)} tensors:"]
        lines += [f"  {k}: {why}" for k, why in sorted(self.dropped.items())]
        return "\n".join(lines)


def _control_model_state(sd: dict, source: str) -> dict[str, torch.Tensor]:
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    prefixed = {k[len(PREFIX):]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(PREFIX)}
    if prefixed:
        return prefixed
    if "input_blocks.0.weight" in sd:
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    raise AdapterError(f"{source!r} holds no BPS control model (no '{PREFIX}*' keys and no bare "
                       f"'input_blocks.0.weight'). Is it an official BPS-v1-1 checkpoint?")


def convert_official_state_dict(sd: dict, source: str = "checkpoint"
                                ) -> tuple[dict[str, torch.Tensor], list[float], BPSConfig, dict[str, str]]:
    """Map an official state dict to (our state dict, omega, config, dropped key -> reason)."""
    control = _control_model_state(sd, source)
    conv_in = control["input_blocks.0.weight"]
    layout = HINT_LAYOUTS.get(conv_in.shape[1])
    if layout is None:
        raise AdapterError(f"{source!r}: first conv takes {conv_in.shape[1]} channels; known layouts are "
                           f"{sorted(HINT_LAYOUTS)} (1-channel sketch, 3-channel layout, style)")
    emb_key = "input_blocks.1.emb_layers.1.weight"
    config = BPSConfig(hint_channels=layout[0], extra_channels=layout[1], model_channels=conv_in.shape[0],
                       time_embed_dim=control[emb_key].shape[1] if emb_key in control else 1280)
    with torch.device("meta"):
        expected = BPSNetwork(config).state_dict()

    # res_weights[i] weighs encoder block i; the last one weighs the middle block.
    res = {int(k.split(".")[1]): float(v) for k, v in control.items() if k.startswith("res_weights.")}
    used_res = {p.block[1]: p.index for p in PORTS if p.group == "encoder"}
    if res:
        used_res[max(res)] = PORTS[8].index
    omega = [p.default_omega for p in PORTS]
    for block, port in used_res.items():
        if block in res:
            omega[port] = res[block]
    for port in PORTS:
        if port.group == "decoder":
            omega[port.index] = 1.0

    state, dropped = {}, {}
    for key, value in control.items():
        if key in expected:
            if tuple(value.shape) != tuple(expected[key].shape):
                raise AdapterError(f"{source!r}: {key} has shape {tuple(value.shape)}, expected "
                                   f"{tuple(expected[key].shape)} for {config}")
            state[key] = value
        elif key.startswith("res_weights."):
            dropped[key] = ("port weight, stored as the adapter's omega" if int(key.split(".")[1]) in used_res
                            else "scalar weight the official network never uses")
        elif key.startswith("zero_blocks."):
            dropped[key] = "zero conv of a conv_in/Downsample block, never used by the official network"
        else:
            dropped[key] = "not part of the BPS network"
    missing = sorted(set(expected) - set(state))
    if missing:
        raise AdapterError(f"{source!r} lacks {len(missing)} BPS tensors (e.g. {', '.join(missing[:3])}); "
                           f"the checkpoint is incomplete")
    return state, omega, config, dropped


def read_checkpoint(path: str) -> dict:
    """Read a .ckpt/.pth with weights_only=True, or a .safetensors; never unpickle objects."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:
            raise AdapterError(f"cannot read {path!r} as safetensors ({e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AdapterError(f"{path!r} does not exist") from None
    except Exception as e:
        raise AdapterError(
            f"{path!r} cannot be read safely: torch.load(weights_only=True) refused it ({str(e).splitlines()[0]}). "
            f"It may pickle arbitrary Python objects, which this converter never executes. Re-save its "
            f"state_dict with plain tensors (torch.save(ckpt['state_dict'], 'clean.ckpt')) in a trusted "
            f"environment, then convert that") from None


def convert_official(in_path: str, out_path: str, *, dtype: torch.dtype = torch.float16,
                     hint_meaning: str = "sketch", overwrite: bool = False) -> ConversionReport:
    """Convert ``in_path`` to an adapter file at ``out_path`` and return the report."""
    if os.path.exists(out_path) and not overwrite:
        raise AdapterError(f"{out_path!r} already exists; pass --overwrite to replace it")
    state, omega, config, dropped = convert_official_state_dict(read_checkpoint(in_path), in_path)
    network = BPSNetwork(config)
    network.load_state_dict({k: v.float() for k, v in state.items()})
    save_adapter(out_path, network, omega=omega, dtype=dtype, hint_meaning=hint_meaning,
                 provenance={"converted_from": os.path.basename(in_path), "source": "official BPS-v1-1"})
    return ConversionReport(config, omega, len(state), dropped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bps.convert_official", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="official checkpoint (.ckpt, .pth or .safetensors)")
    parser.add_argument("output", help="adapter file to write (.safetensors)")
    parser.add_argument("--dtype", choices=_DTYPES, default="fp16", help="storage dtype (default: fp16)")
    parser.add_argument("--hint-meaning", default="sketch",
                        help="what the condition image is: sketch, layout, segmentation, style (default: sketch)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        parser.error("the output must be a .safetensors file")
    try:
        report = convert_official(args.input, args.output, dtype=_DTYPES[args.dtype],
                                  hint_meaning=args.hint_meaning, overwrite=args.overwrite)
    except AdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}\n{report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
