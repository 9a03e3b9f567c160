"""BPSConditionFromImage: make a BPS condition (sketch, edges, layout, ...) from any image.

Runs bps/condition_maps.py, the module the trainer uses to make the conditions of a folder of
images, so an adapter trained with ``--condition sketch`` gets, for a photo, exactly the kind of
condition it learned from: with the adapter connected and ``auto``, its stored preprocessor and
parameters.
"""

from __future__ import annotations

import logging
import os

import torch

import comfy.utils
from comfy_api.latest import io, ui

from ..bps.condition_maps import (ALGORITHM_VERSION, KINDS, PREPROCESSORS, ConditionSpec, condition_image,
                                  parameter_help, parse_overrides)
from ..bps.errors import ConditionError
from .comfy_compat import search_aliases
from .sockets import CATEGORY, BPSAdapterType

log = logging.getLogger(__name__)

AUTO = "auto"
#: What people type into the node search when they want a condition from a photo.
SEARCH_ALIASES = ("canny", "line art", "lineart", "sketch preprocessor", "edge detection", "photo to sketch",
                  "color quantize")
#: Hint meanings (of adapters that store no preprocessor) that name one of ours.
_MEANING_KINDS = {"sketch": "sketch", "edges": "edges", "canny": "edges", "layout": "layout"}


def _adapter_name(adapter) -> str:
    return f" {os.path.basename(adapter.path)!r}" if getattr(adapter, "path", None) else ""


def adapter_condition(adapter) -> tuple[ConditionSpec, str]:
    """The condition an adapter expects, and where that choice came from (for the log).

    Its stored preprocessor and parameters when the trainer made its conditions from images; else
    chosen by its hint meaning (sketch, edges, layout) or, failing that, its channels (gray, rgb).

    Raises:
        ConditionError: a style adapter (RGB plus an extra map, or a 24-channel map), whose
            condition this node cannot make, or stored settings that cannot be read.
    """
    cfg = adapter.config
    if cfg.extra_channels or cfg.hint_channels not in (1, 3):
        raise ConditionError(f"the BPS adapter{_adapter_name(adapter)} is a style adapter "
                             f"({adapter.hint_meaning}); its condition is not made from one image. Use BPS Hint "
                             f"Preprocessor (with extra_map) for it instead")
    stored = adapter.condition
    if stored is None and adapter.metadata.get("condition") is not None:
        raise ConditionError(f"the BPS adapter{_adapter_name(adapter)} stores a garbled preprocessor "
                             f"({str(adapter.metadata['condition'])[:60]!r}); choose one in 'preprocessor' "
                             f"instead of auto")
    if stored is not None:
        try:
            spec = ConditionSpec.from_dict(stored)
        except ConditionError as e:
            raise ConditionError(f"the BPS adapter{_adapter_name(adapter)} stores a preprocessor this version "
                                 f"cannot run ({e}); choose one in 'preprocessor' instead of auto, or update "
                                 f"ComfyUI-BPS") from None
        if stored.get("version") != ALGORITHM_VERSION:
            log.warning("BPS adapter%s was trained with condition algorithm version %s; this pack runs version "
                        "%s, whose %s output may differ slightly", _adapter_name(adapter), stored.get("version"),
                        ALGORITHM_VERSION, spec.kind)
        return spec, "stored in the adapter"
    kind = _MEANING_KINDS.get(str(adapter.hint_meaning).strip().lower())
    if kind is None or PREPROCESSORS[kind].channels != cfg.hint_channels:
        kind = "gray" if cfg.hint_channels == 1 else "rgb"
    return ConditionSpec.make(kind), f"from its hint meaning {adapter.hint_meaning!r} (it stores no preprocessor)"


def resolve_condition(preprocessor: str, parameters: str, adapter=None) -> ConditionSpec:
    """The spec the node runs: ``auto`` takes the adapter's (see :func:`adapter_condition`),
    a named kind its defaults; ``parameters`` ("key=value ...") then change single values.

    Raises:
        ConditionError: ``auto`` without an adapter, an unknown kind or parameter, a bad value,
            or a kind whose channel count differs from the connected adapter's.
    """
    overrides = parse_overrides(parameters or "")
    if preprocessor == AUTO:
        if adapter is None:
            raise ConditionError("preprocessor 'auto' takes the preprocessor an adapter was trained with: connect "
                                 f"bps_adapter, or choose one of {', '.join(KINDS)}")
        spec, origin = adapter_condition(adapter)
        if overrides:
            values = {**spec.to_dict()["params"], **overrides}
            spec = ConditionSpec.make(spec.kind, values)
        log.info("BPS Condition from Image: %s (%s)", spec.describe(), origin)
        return spec
    spec = ConditionSpec.make(preprocessor, overrides)
    if adapter is not None and adapter.config.hint_channels != spec.channels and not adapter.config.extra_channels:
        raise ConditionError(f"{spec.kind} makes {spec.channels}-channel conditions but the BPS adapter"
                             f"{_adapter_name(adapter)} takes {adapter.config.hint_channels} "
                             f"({adapter.hint_meaning}); choose auto or a {adapter.config.hint_channels}-channel "
                             f"preprocessor")
    return spec


def condition_batch(image: torch.Tensor, spec: ConditionSpec) -> torch.Tensor:
    """The condition of every image of a ComfyUI IMAGE batch ``(B, H, W, C)``, as an IMAGE ``(B, H, W, 3)``
    float32 in [0, 1]: the 8-bit condition / 255, exactly what the trainer feeds B_phi for that image
    (1-channel conditions repeated over three channels so every image node can show them)."""
    if image.ndim != 4:
        raise ConditionError(f"expected an IMAGE batch (batch, height, width, channels), got {tuple(image.shape)}")
    pixels = image.detach().to("cpu", torch.float32).numpy()
    bar = comfy.utils.ProgressBar(len(pixels))
    out = []
    for one in pixels:
        u8 = torch.from_numpy(condition_image(one, spec))
        out.append(u8.float() / 255.0)  # the trainer's hint_values: the same op, the same bits
        bar.update(1)
    batch = torch.stack(out)
    return batch.expand(-1, -1, -1, 3).contiguous() if batch.shape[-1] == 1 else batch.contiguous()


def _parameters_tooltip() -> str:
    lines = [f"{kind}: {parameter_help(kind)}" for kind in KINDS if parameter_help(kind) != "none"]
    return ("Change single parameters: key=value, separated by spaces or commas, e.g. sigma=2 threshold=0.01. "
            "Empty: the adapter's values (auto) or the defaults. Sizes are pixels of a 512x512 image, scaled "
            "with the image. Defaults: " + "; ".join(lines) + ".")


class BPSConditionFromImage(io.ComfyNode):
    """Make a sketch, edge map, colour layout, grey or RGB condition from an image."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BPSConditionFromImage",
            display_name="BPS Condition from Image",
            category=CATEGORY,
            **search_aliases(SEARCH_ALIASES),
            description="Turn a photo or render into a BPS condition with the trainer's own preprocessors: sketch "
                        "(light strokes on black), edges (Canny), layout (flat colour regions), gray or rgb. With "
                        "an adapter trained from images (train_bps.py --condition) and 'auto', it makes exactly "
                        "the condition that adapter was trained on. Resolution-aware: a 512 and a 1024 px photo "
                        "give the same look.",
            inputs=[
                io.Image.Input("image", tooltip="The photo or render to make the condition from."),
                io.Combo.Input("preprocessor", options=[AUTO, *KINDS], default=AUTO,
                               tooltip="auto: the preprocessor and parameters stored in the connected adapter "
                                       "(adapters without one: sketch, edges or layout by their hint meaning, "
                                       "else gray/rgb). sketch: line drawing. edges: Canny. layout: flat "
                                       "colour regions (3 channels). gray / rgb: the image itself."),
                io.String.Input("parameters", default="", multiline=False, tooltip=_parameters_tooltip()),
                BPSAdapterType.Input("bps_adapter", optional=True,
                                     tooltip="The adapter the condition is for: 'auto' uses its preprocessor; a "
                                             "chosen preprocessor must make as many channels as it takes."),
            ],
            outputs=[io.Image.Output(display_name="condition",
                                     tooltip="The condition image for Apply BPS (1-channel conditions shown as "
                                             "grey RGB); also previewed on the node.")],
        )

    @classmethod
    def execute(cls, image, preprocessor: str, parameters: str, bps_adapter=None) -> io.NodeOutput:
        spec = resolve_condition(preprocessor, parameters, bps_adapter)
        out = condition_batch(image, spec)
        return io.NodeOutput(out, ui=ui.PreviewImage(out, cls=cls))
