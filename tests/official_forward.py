"""An independent reference of the official BPS-v1-1 forward, computed functionally from an official
``control_model`` state dict (official key names, ``res_weights`` applied), for parity tests.

Written from the architecture facts (BPS_SPEC.md and the key list's README), not from this pack's
network: it reads the official keys directly, so a key this pack names or uses differently shows up
as a mismatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference_unet import hand_run_unet

#: SD1.5 layout of the official network: Downsample input blocks, decoder blocks that end in an Upsample.
DOWNSAMPLES = (3, 6, 9)
UPSAMPLES = (2, 5, 8)


def reference_ports(sd: dict[str, torch.Tensor], hint: torch.Tensor, emb: torch.Tensor,
                    extra: torch.Tensor | None = None, unshuffle: int = 8) -> list[torch.Tensor]:
    """The official port outputs, res_weights applied, in port order (input blocks 1, 2, 4, 5, 7, 8,
    10, 11; middle; output blocks 0..11).

    Args:
        sd: official control_model state dict (keys without prefix).
        hint: the condition as the official code feeds it; pixel-unshuffled by ``unshuffle``
            (1 = already at latent resolution: used as is).
        emb: the UNet's time embedding.
        extra: BPS_forstyle's extra map, pixel-unshuffled by 8 and concatenated after the hint.
    """
    res = [float(sd[f"res_weights.{i}"]) for i in range(14)]

    def conv(x, name, stride=1):
        return F.conv2d(x, sd[name + ".weight"], sd[name + ".bias"], stride=stride, padding=1)

    def norm(x, name):
        return F.group_norm(x.float(), 32, sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    def skip(x, name):
        key = name + ".skip_connection.weight"
        return F.conv2d(x, sd[key], sd[name + ".skip_connection.bias"]) if key in sd else x

    def resblock(x, name):
        h = conv(F.silu(norm(x, name + ".in_layers.0")), name + ".in_layers.2")
        e = F.linear(F.silu(emb), sd[name + ".emb_layers.1.weight"], sd[name + ".emb_layers.1.bias"])
        scale, shift = e[:, :, None, None].chunk(2, dim=1)
        h = norm(h, name + ".out_layers.0") * (1 + scale) + shift
        return skip(x, name) + conv(F.silu(h), name + ".out_layers.3")

    x = hint.contiguous()  # the official get_input makes the hint contiguous
    x = F.pixel_unshuffle(x, unshuffle) if unshuffle > 1 else x
    if extra is not None:
        x = torch.cat([x, F.pixel_unshuffle(extra.contiguous(), 8)], dim=1)
    h = conv(x, "input_blocks.0")
    skips, outs = [h], []
    for i in range(1, 12):
        if i in DOWNSAMPLES:
            h = conv(h, f"input_blocks.{i}.op", stride=2)  # its zero conv is computed and thrown away
        else:
            h = resblock(h, f"input_blocks.{i}")
            outs.append(res[i] * conv(h, f"zero_blocks.{i}"))
        skips.append(h)
    h = resblock(resblock(h, "middle_block.0"), "middle_block.1")
    outs.append(res[-1] * conv(h, "zero_blocks.12"))  # zero_blocks[-1], res_weights[-1]
    for k in range(12):
        x = torch.cat([h, skips.pop()], dim=1)
        name = f"output_blocks.{k}.0"
        h = skip(x, name) + conv(F.silu(norm(x, name + ".out_layers.0")), name + ".out_layers.3")
        outs.append(conv(h, f"output_blocks.{k}.1"))  # decoder ports have no weight
        if k in UPSAMPLES:
            h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"output_blocks.{k}.2.conv")
    return outs


def reference_steered_unet(unet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                           sd: dict[str, torch.Tensor], hint: torch.Tensor, **hint_kwargs) -> torch.Tensor:
    """The official steered UNet: ComfyUI's SD1.5 UNet (``unet``, its ``diffusion_model``) run by hand
    block by block, each port's official output (:func:`reference_ports`, res_weights applied) added
    after every ResBlock and SpatialTransformer of the port's block, never after Down/Upsamples.

    ``hint`` has one row per row of ``x`` (or one for all); ``t`` are UNet timesteps.
    """
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    emb = unet.time_embed(timestep_embedding(t, unet.model_channels, repeat_only=False).to(x.dtype))
    rows = hint.expand(x.shape[0], *hint.shape[1:]) if hint.shape[0] == 1 else hint
    ports = reference_ports(sd, rows, emb, **hint_kwargs)
    return hand_run_unet(unet, x, emb, context, dict(enumerate(ports)))
