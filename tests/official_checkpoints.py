"""Official BPS-v1-1 ``control_model`` state dicts for the tests, built from the official key list.

The key list (``../shared/bps-official/control_model_keys.json``, or the file named by
``BPS_OFFICIAL_KEYS``) was made by instantiating the official classes with the four configurations
the release ships; it is the artifact the tests check against, never this pack's own network.
``official_state_dict`` fills every key of one configuration with seeded random values, either at
the official size or with every width divided by ``SCALE`` (320 -> 32, 1280 -> 128, ...: the same
keys and the same structure, cheap enough for unit tests).
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KEYS_ENV = "BPS_OFFICIAL_KEYS"
DEFAULT_KEYS = ROOT.parent / "shared" / "bps-official" / "control_model_keys.json"

#: Short names used in the tests -> the official config file each entry of the key list is made from.
CONFIGS = {
    "sketch": "bps_sd15_pidinet.yaml",
    "layout": "bps_sd15_layout.yaml",
    "style": "bps_sd15_style.yaml",
    "style2": "bps_sd15_style2.yaml",
}
#: What the official code feeds each configuration (the key list's README): image channels, extra-map
#: channels, pixel-unshuffle factor. The independent reference forward of the tests uses these.
HINTS = {"sketch": (1, 0, 8), "layout": (3, 0, 8), "style": (3, 1, 8), "style2": (24, 0, 1)}
#: Widths of the official network are multiples of 320; dividing them by 10 keeps GroupNorm's 32 groups.
SCALE = 10
#: Prefix of the control model in an official training checkpoint.
PREFIX = "model.diffusion_model.control_model."


def keys_path() -> Path:
    """The key list: $BPS_OFFICIAL_KEYS, else ../shared/bps-official/control_model_keys.json."""
    env = os.environ.get(KEYS_ENV)
    return Path(env).expanduser() if env else DEFAULT_KEYS


def missing_reason() -> str | None:
    """Why the key list cannot be read (a skip reason), or None when it can."""
    path = keys_path()
    if path.is_file():
        return None
    return (f"the official BPS-v1-1 key list {path} is missing: put shared/ (with bps-official/"
            f"control_model_keys.json) beside the repository, or set {KEYS_ENV}=/path/to/control_model_keys.json")


@functools.lru_cache(maxsize=1)
def key_list() -> dict[str, dict]:
    """Short config name -> its entry of the key list (class, params, res_weights_in_yaml, numel, keys)."""
    data = json.loads(keys_path().read_text())
    entries = {name.split(" ")[0]: entry for name, entry in data.items() if not name.startswith("_")}
    assert sorted(entries) == sorted(CONFIGS.values()), (
        f"the key list holds {sorted(entries)}, the tests expect the four official configurations "
        f"{sorted(CONFIGS.values())}")
    return {short: entries[yaml] for short, yaml in CONFIGS.items()}


def official_shapes(name: str, scale: int = 1) -> dict[str, tuple[int, ...]]:
    """Every key of the official control_model of config ``name`` with its shape, in the official order.

    ``scale`` > 1 divides every dimension that is a multiple of 320 (the official widths) by it.
    """
    shapes = {k: tuple(s) for k, s in key_list()[name]["keys"].items()}
    if scale > 1:
        shapes = {k: tuple(d // scale if d % 320 == 0 else d for d in s) for k, s in shapes.items()}
    return shapes


def official_numel(name: str) -> int:
    """The key list's total number of values of config ``name`` (at the official size)."""
    return int(key_list()[name]["numel"])


def official_res_weights(name: str) -> list[float]:
    """The 14 ``res_weights`` the official network of ``name`` holds: ``[1] + the yaml's``."""
    return [1.0] + [float(w) for w in key_list()[name]["res_weights_in_yaml"]]


def official_state_dict(name: str, *, scale: int = SCALE, seed: int = 0,
                        res: list[float] | None = None) -> dict[str, torch.Tensor]:
    """A random (non-zero) official control_model state dict of config ``name``, every key included.

    Weights are scaled like a default init so activations stay O(1) through the whole network;
    ``res_weights`` are the official ones unless ``res`` gives 14 others. At ``scale=1`` this is the
    official size (2.8 GB in fp32 for any configuration: build one at a time and drop it after use).
    Returns a new dict each call; cached tensors are shared between calls, so never modify them.
    """
    res = tuple(official_res_weights(name) if res is None else res)
    if scale == 1:
        return _build(name, scale, seed, res)
    return dict(_cached(name, scale, seed, res))


@functools.lru_cache(maxsize=8)
def _cached(name: str, scale: int, seed: int, res: tuple[float, ...]) -> dict[str, torch.Tensor]:
    return _build(name, scale, seed, res)


def _build(name: str, scale: int, seed: int, res: tuple[float, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in official_shapes(name, scale).items():
        if key.startswith("res_weights."):
            sd[key] = torch.tensor(float(res[int(key.split(".")[1])]))
        elif len(shape) > 1:
            sd[key] = torch.randn(shape, generator=g).mul_(1 / math.sqrt(math.prod(shape[1:])))
        elif ".in_layers.0." in key or ".out_layers.0." in key:  # GroupNorm affine
            sd[key] = (1 + 0.1 * torch.randn(shape, generator=g)) if key.endswith("weight") \
                else 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.1 * torch.randn(shape, generator=g)
    return sd


def lightning_checkpoint(control: dict[str, torch.Tensor]) -> dict:
    """``control`` as the official training code saves it: a Lightning checkpoint whose state_dict
    holds the whole SD model beside the control model (a few stand-in SD tensors) and optimizer state."""
    return {"epoch": 15, "global_step": 40, "pytorch-lightning_version": "1.5.0",
            "state_dict": {**{PREFIX + k: v for k, v in control.items()},
                           "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                           "model.diffusion_model.out.2.bias": torch.zeros(4),
                           "first_stage_model.decoder.conv_in.weight": torch.zeros(2),
                           "cond_stage_model.transformer.text_model.final_layer_norm.bias": torch.zeros(3)},
            "optimizer_states": [{"state": {0: {"step": torch.tensor(40.0)}}, "param_groups": [{"lr": 1e-5}]}]}
