"""The 21 BPS ports: where in the SD1.5 UNet each residual goes, and with what default weight.

This table is the single source of truth for the port layout. The network returns its residuals
in this order, the ComfyUI integration injects them by it, the trainer and the omega schedules
read the groups and default weights from it, and the README's table is generated from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PortGroup = Literal["encoder", "middle", "decoder"]
GROUPS: tuple[PortGroup, ...] = ("encoder", "middle", "decoder")

#: UNet sub-layers that receive a port's residual. Down/Upsample layers never do.
INJECTED_LAYER_KINDS: tuple[str, ...] = ("ResBlock", "SpatialTransformer")


@dataclass(frozen=True)
class Port:
    """One injection port of the SD1.5 UNet.

    Attributes:
        index: position 0..20 in the network's output and in every omega vector.
        name: stable short name, e.g. ``"input_4"``, ``"middle"``, ``"output_11"``.
        block: ``(kind, number)`` as ComfyUI's UNet names it in ``transformer_options["block"]``:
            ``("input", 1)``, ``("middle", 0)``, ``("output", 7)``.
        module_path: attribute path of the block inside the UNet, e.g. ``"input_blocks.4"``.
        group: ``"encoder"``, ``"middle"`` or ``"decoder"``.
        channels: channel count of the residual (and of the hidden state it is added to).
        downsample: latent height / residual height (1, 2, 4 or 8).
        default_omega: the paper's "top-heavy" weight for this port.
        sublayers: how many sub-layers of the block receive the residual (ResBlocks plus
            SpatialTransformers); the residual is added after each of them.
    """

    index: int
    name: str
    block: tuple[str, int]
    module_path: str
    group: PortGroup
    channels: int
    downsample: int
    default_omega: float
    sublayers: int


def _build_ports() -> tuple[Port, ...]:
    ports: list[Port] = []
    # (block number, channels, downsample, default omega, sub-layers that get the residual)
    encoder = [
        (1, 320, 1, 16.0, 2), (2, 320, 1, 16.0, 2),
        (4, 640, 2, 8.0, 2), (5, 640, 2, 8.0, 2),
        (7, 1280, 4, 4.0, 2), (8, 1280, 4, 4.0, 2),
        (10, 1280, 8, 2.0, 1), (11, 1280, 8, 2.0, 1),
    ]
    for number, channels, down, omega, sub in encoder:
        ports.append(Port(len(ports), f"input_{number}", ("input", number), f"input_blocks.{number}",
                          "encoder", channels, down, omega, sub))
    ports.append(Port(len(ports), "middle", ("middle", 0), "middle_block", "middle", 1280, 8, 16.0, 3))
    decoder_levels = [(1280, 8, 1), (1280, 4, 2), (640, 2, 2), (320, 1, 2)]
    for level, (channels, down, sub) in enumerate(decoder_levels):
        for k in range(3):
            number = 3 * level + k
            ports.append(Port(len(ports), f"output_{number}", ("output", number), f"output_blocks.{number}",
                              "decoder", channels, down, 1.0, sub))
    return tuple(ports)


#: The 21 ports in network output order: encoder input_blocks 1,2,4,5,7,8,10,11; middle; output_blocks 0..11.
PORTS: tuple[Port, ...] = _build_ports()
NUM_PORTS: int = len(PORTS)

#: Default ("paper", top-heavy) omega, one float per port, in port order.
PAPER_OMEGA: tuple[float, ...] = tuple(p.default_omega for p in PORTS)

#: UNet input blocks that carry no port (conv_in and the three Downsamples).
UNPORTED_INPUT_BLOCKS: tuple[int, ...] = (0, 3, 6, 9)

_BY_NAME = {p.name: p for p in PORTS}
_BY_BLOCK = {p.block: p for p in PORTS}


def port_by_name(name: str) -> Port:
    """Return the port called ``name`` (``"input_1"``, ``"middle"``, ``"output_0"`` ...)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown BPS port {name!r}; known ports: {', '.join(_BY_NAME)}") from None


def port_for_block(kind: str, number: int) -> Port | None:
    """Return the port of UNet block ``(kind, number)``, or None for blocks without one."""
    return _BY_BLOCK.get((kind, number))


def ports_in_group(group: str) -> tuple[Port, ...]:
    """Return the ports of one group (``"encoder"``, ``"middle"`` or ``"decoder"``)."""
    if group not in GROUPS:
        raise ValueError(f"unknown port group {group!r}; use one of {', '.join(GROUPS)}")
    return tuple(p for p in PORTS if p.group == group)
