"""BPSHintPreprocessor: turn an image into the condition image an adapter expects."""

from __future__ import annotations

import torch

from comfy_api.latest import io

from ..bps.errors import HintError
from .apply import refuse_unfeedable
from .sockets import CATEGORY, BPSAdapterType
from .hint_fit import LUMA, fit_image


def _luminance(image: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, H, W, 1): RGB by BT.601 luminance; one channel as is; alpha dropped."""
    if image.shape[-1] == 1:
        return image
    weights = torch.tensor(LUMA, dtype=image.dtype, device=image.device)
    return (image[..., :3] * weights).sum(dim=-1, keepdim=True)


def prepare_hint(image: torch.Tensor, hint_channels: int, extra_channels: int = 0, *, invert: bool = False,
                 threshold: float = 0.0, extra_map: torch.Tensor | None = None) -> torch.Tensor:
    """Condition image ``(B, H, W, C)`` in [0, 1] laid out for an adapter.

    1-channel adapters get luminance (returned as three equal channels, so every image node can show
    it); 3-channel adapters get RGB. ``invert`` flips black and white (dark strokes on light paper
    vs. light strokes on dark); ``threshold`` > 0 binarises at that level. Style adapters with an
    extra map get it, as luminance, packed after the image channels (fitted to the image's size).

    Raises:
        HintError: a style adapter without ``extra_map``, an extra map for an adapter that takes
            none, or batches that do not match.
    """
    image = image[..., :3] if image.shape[-1] == 4 else image
    if hint_channels == 1:
        out = _luminance(image)
    elif image.shape[-1] == 1:
        out = image.expand(*image.shape[:-1], 3)
    else:
        out = image
    if invert:
        out = 1.0 - out
    if threshold > 0:
        out = (out >= threshold).to(out.dtype)
    if hint_channels == 1:
        out = out.expand(*out.shape[:-1], 3)
    if extra_channels == 0:
        if extra_map is not None:
            raise HintError("this adapter takes no extra map; disconnect extra_map (only style adapters use one)")
        return out.contiguous()
    if extra_map is None:
        raise HintError(f"this style adapter needs an extra map ({extra_channels} channel) besides the image; "
                        f"connect one to extra_map")
    if extra_map.shape[0] not in (1, out.shape[0]):
        raise HintError(f"extra_map has a batch of {extra_map.shape[0]}, the image {out.shape[0]}: use one extra "
                        f"map or one per image")
    extra = _luminance(extra_map).movedim(-1, 1)
    extra = fit_image(extra, out.shape[1], out.shape[2]).movedim(1, -1).expand(out.shape[0], -1, -1, -1)
    base = out[..., :1] if hint_channels == 1 else out
    return torch.cat([base, extra.expand(*extra.shape[:-1], extra_channels)], dim=-1).contiguous()


class BPSHintPreprocessor(io.ComfyNode):
    """Match an image to the adapter's hint channels, with optional inversion and thresholding."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BPSHintPreprocessor",
            display_name="BPS Hint Preprocessor",
            category=CATEGORY,
            description="Prepare a condition image for a BPS adapter and show what the adapter sees: grey "
                        "(luminance) for 1-channel sketch adapters, RGB for layout/segmentation adapters, RGB "
                        "plus the extra map for style adapters. Optionally invert (to match the stroke colour the "
                        "adapter was trained on: the trainer's demo set uses white strokes on black) and binarise.",
            inputs=[
                io.Image.Input("image", tooltip="The image to turn into a condition image."),
                BPSAdapterType.Input("bps_adapter", tooltip="The adapter the hint is for; its channel layout "
                                                            "decides the conversion."),
                io.Boolean.Input("invert", default=False,
                                 tooltip="Flip black and white, e.g. for dark pencil lines on white paper when "
                                         "the adapter was trained on white strokes on black."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Binarise: values >= threshold become 1, others 0 (after invert). 0 "
                                       "keeps grey levels."),
                io.Image.Input("extra_map", optional=True,
                               tooltip="Style adapters only: the extra map packed after the RGB channels "
                                       "(converted to luminance, fitted to the image)."),
            ],
            outputs=[io.Image.Output(display_name="hint",
                                     tooltip="The condition image for Apply BPS (grey shown as RGB; style "
                                             "hints carry a 4th channel).")],
        )

    @classmethod
    def execute(cls, image, bps_adapter, invert: bool, threshold: float, extra_map=None) -> io.NodeOutput:
        refuse_unfeedable(bps_adapter, "BPS Hint Preprocessor")
        cfg = bps_adapter.config
        return io.NodeOutput(prepare_hint(image, cfg.hint_channels, cfg.extra_channels, invert=invert,
                                          threshold=threshold, extra_map=extra_map))
