"""ComfyUI's UNet (SD1.5, or SDXL with ``block_ports``) run by hand, block by block, with residuals
added where BPS's rule puts them: the reference the exactness tests compare the steered model
against.

Written from BPS_SPEC.md's injection rule, not from nodes/steering.py: each port's residual is
added after every ResBlock and SpatialTransformer of the port's block, never after a
Downsample/Upsample. A ControlNet's ``control`` residuals go where ComfyUI's UNet applies them.
"""

from __future__ import annotations

import torch

#: Port index (bps.ports order) of each SD1.5 UNet block.
BLOCK_PORTS = {("input", n): i for i, n in enumerate((1, 2, 4, 5, 7, 8, 10, 11))}
BLOCK_PORTS[("middle", 0)] = 8
BLOCK_PORTS.update({("output", n): 9 + n for n in range(12)})

#: Port index of each SDXL UNet block, written out from the rule: input blocks 0, 3 and 6 are
#: conv_in and the two Downsamples (no port); the middle; all nine output blocks.
SDXL_BLOCK_PORTS = {("input", n): i for i, n in enumerate((1, 2, 4, 5, 7, 8))}
SDXL_BLOCK_PORTS[("middle", 0)] = 6
SDXL_BLOCK_PORTS.update({("output", n): 7 + n for n in range(9)})


def hand_run_unet(unet, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                  residual: dict[int, torch.Tensor], control: dict | None = None,
                  block_ports: dict | None = None) -> torch.Tensor:
    """The UNet's output for input ``x``, time embedding ``emb`` (already through ``time_embed``) and
    text ``context``, with ``residual[port]`` added after every ResBlock/SpatialTransformer of that
    port's block (ports missing from ``residual`` get nothing).

    ``control`` is the dict a ComfyUI ControlNet hands the UNet (``input``/``middle``/``output``
    lists, popped from the end). Blocks of a steered model are accepted: their BPS markers are
    skipped, so only ``residual`` steers. ``block_ports``: which port each block has
    (default SD1.5's :data:`BLOCK_PORTS`; :data:`SDXL_BLOCK_PORTS` for SDXL). For SDXL, ``emb`` is
    what the UNet's ResBlocks get: ``time_embed(t) + label_emb(y)``.
    """
    block_ports = BLOCK_PORTS if block_ports is None else block_ports
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, Upsample

    def run(block, h, where, output_shape=None):
        port = block_ports.get(where)
        for layer in block:
            if type(layer).__name__ == "BPSInjectionPoint":
                continue
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, transformer_options={})
            elif isinstance(layer, Upsample):
                h = layer(h, output_shape=output_shape)
            else:
                h = layer(h)
            if port in residual and isinstance(layer, (ResBlock, SpatialTransformer)):
                h = h + residual[port]
        return h

    control = {k: list(v) for k, v in (control or {}).items()}

    def controlled(h, name):
        ctrl = control[name].pop() if control.get(name) else None
        return h if ctrl is None else h + ctrl

    hs, h = [], x
    for n, block in enumerate(unet.input_blocks):
        h = controlled(run(block, h, ("input", n)), "input")
        hs.append(h)
    h = controlled(run(unet.middle_block, h, ("middle", 0)), "middle")
    for n, block in enumerate(unet.output_blocks):
        h = torch.cat([h, controlled(hs.pop(), "output")], dim=1)
        h = run(block, h, ("output", n), hs[-1].shape if hs else None)
    return unet.out(h)
