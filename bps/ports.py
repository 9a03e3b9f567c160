"""The BPS ports of a UNet: where each residual goes, and with what default weight.

One rule gives the ports of every SD-family UNet (SD1.5's 21 are one instance of it, SDXL's 16
another): a port for every input block that starts with a ResBlock, one for the middle block,
one for every output block. A port's residual has the width of its level
(``model_channels x channel_mult[level]``), is ``2**level`` times smaller than the latent, and is
added after every ResBlock and SpatialTransformer of the block, never after conv_in, a
Downsample or an Upsample. Default weights: the middle port's weight on the top encoder level,
halving per level down, and 1 on the decoder (SD1.5: 16/8/4/2, middle 16; SDXL 32/16/8, middle
32, from the official ``BPS_XL``).

:func:`port_map` applies the rule to a :class:`~bps.unet_shape.UNetShape`. The network returns
its residuals in port order, the ComfyUI integration injects them by it, the trainer and the
omega schedules read groups and default weights from it, and the README's tables are generated
from it. ``PORTS``, ``NUM_PORTS`` and ``PAPER_OMEGA`` are SD1.5's map, kept as module constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Literal

from .unet_shape import INJECTED_KINDS, SD15_SHAPE, UNetShape

PortGroup = Literal["encoder", "middle", "decoder"]
GROUPS: tuple[PortGroup, ...] = ("encoder", "middle", "decoder")

#: UNet sub-layers that receive a port's residual (ComfyUI class names). Down/Upsample never do.
INJECTED_LAYER_KINDS: tuple[str, ...] = ("ResBlock", "SpatialTransformer")

#: Top encoder level's (and the middle's) default weight per family; the official releases'
#: values. Any other UNet gets SD1.5's.
_TOP_OMEGA = {"SDXL": 32.0}
_DEFAULT_TOP_OMEGA = 16.0


@dataclass(frozen=True)
class Port:
    """One injection port of a UNet.

    Attributes:
        index: position in the network's output and in every omega vector.
        name: stable short name from the block, e.g. ``"input_4"``, ``"middle"``, ``"output_11"``.
        block: ``(kind, number)`` as ComfyUI's UNet names it in ``transformer_options["block"]``:
            ``("input", 1)``, ``("middle", 0)``, ``("output", 7)``.
        module_path: attribute path of the block inside the UNet, e.g. ``"input_blocks.4"``.
        group: ``"encoder"``, ``"middle"`` or ``"decoder"``.
        channels: channel count of the residual (and of the hidden state it is added to).
        downsample: latent height / residual height (a power of 2).
        default_omega: the default ("top-heavy") weight of this port.
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


class PortMap:
    """The ports of one UNet shape, in network output order (encoder, middle, decoder)."""

    def __init__(self, shape: UNetShape, ports: tuple[Port, ...]):
        self.shape = shape
        self.ports = ports
        self._by_name = {p.name: p for p in ports}
        self._by_block = {p.block: p for p in ports}

    def __len__(self) -> int:
        return len(self.ports)

    def __iter__(self) -> Iterator[Port]:
        return iter(self.ports)

    def __getitem__(self, index: int) -> Port:
        return self.ports[index]

    def __repr__(self) -> str:
        return f"PortMap({self.shape.family}, {len(self)} ports)"

    @property
    def default_omega(self) -> tuple[float, ...]:
        """Default weight of every port, in port order."""
        return tuple(p.default_omega for p in self.ports)

    @property
    def names(self) -> tuple[str, ...]:
        """Port names in port order."""
        return tuple(p.name for p in self.ports)

    @property
    def additions(self) -> int:
        """Residual additions per UNet call (38 for SD1.5, 28 for SDXL)."""
        return sum(p.sublayers for p in self.ports)

    def by_name(self, name: str) -> Port:
        """The port called ``name``; KeyError listing the known names otherwise."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown BPS port {name!r}; known ports: {', '.join(self._by_name)}") from None

    def for_block(self, kind: str, number: int) -> Port | None:
        """The port of UNet block ``(kind, number)``, or None for blocks without one."""
        return self._by_block.get((kind, number))

    def in_group(self, group: str) -> tuple[Port, ...]:
        """The ports of one group (``"encoder"``, ``"middle"`` or ``"decoder"``)."""
        if group not in GROUPS:
            raise ValueError(f"unknown port group {group!r}; use one of {', '.join(GROUPS)}")
        return tuple(p for p in self.ports if p.group == group)


def _injected(layers: tuple[str, ...]) -> int:
    return sum(kind in INJECTED_KINDS for kind in layers)


def bps_problem(shape: UNetShape) -> str | None:
    """Why BPS cannot steer a UNet of this shape, or None when the port rule covers it.

    B_phi mirrors the UNet with one ResBlock count for every level and a middle block, and the
    rule needs blocks laid out as the SD UNet lays them out; anything else is refused by name.
    """
    levels = len(shape.channel_mult)
    if len(set(shape.num_res_blocks)) != 1:
        return (f"its levels have different ResBlock counts ({list(shape.num_res_blocks)}); B_phi mirrors UNets "
                f"with one count for every level (SD1.5, SDXL), which this one (e.g. KOALA) is not")
    if not shape.middle_block:
        return "it has no middle block (e.g. KOALA, SD-XS); the BPS port rule needs one"
    if "res" not in shape.middle_block:
        return f"its middle block holds {list(shape.middle_block)}, no ResBlock"
    n = shape.num_res_blocks[0]
    if len(shape.input_blocks) != 1 + levels * n + levels - 1 or len(shape.output_blocks) != levels * (n + 1):
        return (f"it has {len(shape.input_blocks)} input / {len(shape.output_blocks)} output blocks, which "
                f"{levels} levels of {n} ResBlocks do not give")
    if shape.input_blocks[0] != ("conv",):
        return f"its first input block holds {list(shape.input_blocks[0])}, not conv_in alone"
    blocks = [*shape.input_blocks[1:], *shape.output_blocks]
    if any(not b or b[0] not in ("res", "down") for b in blocks):
        return "some of its blocks do not start with a ResBlock or a Downsample"
    return None


@lru_cache(maxsize=32)
def port_map(shape: UNetShape) -> PortMap:
    """The ports of a UNet of this shape, by the rule in this module's docstring.

    Raises:
        ValueError: the rule does not cover this UNet (:func:`bps_problem` says why).
    """
    problem = bps_problem(shape)
    if problem:
        raise ValueError(f"BPS cannot steer {shape.family}: {problem}")
    levels = len(shape.channel_mult)
    width = [shape.model_channels * m for m in shape.channel_mult]
    top = _TOP_OMEGA.get(shape.family, _DEFAULT_TOP_OMEGA)
    ports: list[Port] = []

    def add(name: str, block: tuple[str, int], path: str, group: PortGroup, level: int, omega: float,
            layers: tuple[str, ...]) -> None:
        ports.append(Port(len(ports), name, block, path, group, width[level], 2 ** level, omega, _injected(layers)))

    level = 0
    for number, layers in enumerate(shape.input_blocks):
        if layers == ("down",):
            level += 1
        elif layers[0] == "res":
            add(f"input_{number}", ("input", number), f"input_blocks.{number}", "encoder", level,
                top / 2 ** level, layers)
    add("middle", ("middle", 0), "middle_block", "middle", levels - 1, top, shape.middle_block)
    per_level = shape.num_res_blocks[0] + 1
    for number, layers in enumerate(shape.output_blocks):
        add(f"output_{number}", ("output", number), f"output_blocks.{number}", "decoder",
            levels - 1 - number // per_level, 1.0, layers)
    return PortMap(shape, tuple(ports))


#: SD1.5's port map: encoder input_blocks 1,2,4,5,7,8,10,11; middle; output_blocks 0..11.
SD15_PORTS: PortMap = port_map(SD15_SHAPE)
#: The 21 SD1.5 ports in network output order.
PORTS: tuple[Port, ...] = SD15_PORTS.ports
NUM_PORTS: int = len(PORTS)

#: SD1.5's default ("paper", top-heavy) omega, one float per port, in port order.
PAPER_OMEGA: tuple[float, ...] = SD15_PORTS.default_omega

#: SD1.5 input blocks that carry no port (conv_in and the three Downsamples).
UNPORTED_INPUT_BLOCKS: tuple[int, ...] = (0, 3, 6, 9)


def port_by_name(name: str) -> Port:
    """Return the SD1.5 port called ``name`` (``"input_1"``, ``"middle"``, ``"output_0"`` ...)."""
    return SD15_PORTS.by_name(name)


def port_for_block(kind: str, number: int) -> Port | None:
    """Return the SD1.5 port of UNet block ``(kind, number)``, or None for blocks without one."""
    return SD15_PORTS.for_block(kind, number)


def ports_in_group(group: str) -> tuple[Port, ...]:
    """Return the SD1.5 ports of one group (``"encoder"``, ``"middle"`` or ``"decoder"``)."""
    return SD15_PORTS.in_group(group)
