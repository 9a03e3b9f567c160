"""The trainable module: B_phi plus the frozen UNet it steers, through nodes/steering.py.

The forward pass runs ComfyUI's UNet with the adapter attached by the same code the BPSApply node
uses (``nodes.steering``), so training and sampling cannot disagree on where or how residuals are
injected. Only the adapter network is a registered submodule: DistributedDataParallel then
synchronises just B_phi's gradients, and never broadcasts the 860M frozen UNet weights.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from ..bps.network import BPSNetwork
from ..bps.ports import SD15_PORTS, PortMap
from ..bps.schedule import OmegaSchedule, OmegaSpec, make_schedule
from ..bps.unet_shape import UNetShape
from ..nodes import steering


def training_omega(preset: str, ports: PortMap = SD15_PORTS) -> list[float]:
    """Port weights used in training and stored in the adapter, for a UNet with ``ports``.

    Encoder and middle ports take the preset's weights (fixed, as in the official code); decoder
    ports weigh 1 as in the official recipe, or 0 where the preset switches the decoder off
    (integration modes without D).
    """
    base = OmegaSpec(preset=preset).base_weights(ports.default_omega, ports)
    return [float(w) if p.group != "decoder" else (1.0 if w != 0 else 0.0) for p, w in zip(ports, base)]


def training_schedule(omega: Sequence[float], ports: PortMap = SD15_PORTS) -> OmegaSchedule:
    """Constant weights ``omega`` at every timestep (no strength, start/end or curve)."""
    return make_schedule(list(omega), None, ports=ports)


class SteeredUNet(nn.Module):
    """prediction = UNet(x_t, t, context, y) steered by B_phi(hint, t); only ``network`` is trainable."""

    def __init__(self, network: BPSNetwork, model: Any, omega: Sequence[float], unet_shape: UNetShape | None = None):
        super().__init__()
        self.network = network
        self.omega = [float(w) for w in omega]
        # A tuple keeps ComfyUI's objects out of the module tree (DDP must not see the UNet).
        self._runner = (steering.SteeredForward(model, network, self.omega,
                                                unet_shape or steering.model_unet_shape(model)),)

    @property
    def steered_model(self) -> Any:
        """The patched clone of the base ModelPatcher that training runs."""
        return self._runner[0].model

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, hint: Tensor, y: Tensor | None = None
                ) -> Tensor:
        """The UNet's prediction (noise, or v for v-prediction models) for UNet input ``x`` (already
        scaled), timesteps 0..999, text context, hint (B, C, H, W) in [0, 1] and, for SDXL, ``y``
        (pooled text + size embedding); differentiable with respect to the network's weights."""
        return self._runner[0](hint, x, timestep, context, y)
