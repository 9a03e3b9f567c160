"""Which adapter weights can learn: those that reach a port with a non-zero omega.

With an integration-mode preset that switches ports off (E, M, EM, ...), the branches feeding
only those ports cannot change the steered UNet's output: their gradients are exactly zero and
AdamW would only decay them. They are frozen (kept at their zero-initialised outputs), which
also spares their gradients and optimizer state: for "E" about 65% of the adapter.
Reachability is read off the autograd graph of one tiny forward pass, so it follows the network
whatever its layout.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..bps.network import BPSNetwork


def reachable_parameters(network: BPSNetwork, active_ports: Sequence[int]) -> set[str]:
    """Names of the parameters that influence any of the ``active_ports`` outputs."""
    cfg = network.config
    device = next(network.parameters()).device
    side = cfg.downscale * 2 ** (len(cfg.channel_mult) - 1)  # smallest hint every level accepts
    hint = torch.zeros(1, cfg.hint_channels, side, side, device=device)
    extra = None
    if cfg.extra_channels:
        e = side // cfg.downscale * cfg.extra_downscale
        extra = torch.zeros(1, cfg.extra_channels, e, e, device=device)
    emb = torch.zeros(1, cfg.time_embed_dim, device=device)
    names, params = zip(*[(n, p) for n, p in network.named_parameters()])
    with torch.enable_grad():
        outs = network(hint, emb, extra)
        total = sum(outs[i].sum() for i in active_ports)
        grads = torch.autograd.grad(total, params, allow_unused=True)
    return {n for n, g in zip(names, grads) if g is not None}


def freeze_unreachable(network: BPSNetwork, omega: Sequence[float]) -> tuple[int, int]:
    """Freeze parameters that cannot affect a port with non-zero weight.

    Returns:
        (trainable parameter count, total parameter count).
    """
    active = [i for i, w in enumerate(omega) if w != 0]
    total = sum(p.numel() for p in network.parameters())
    if len(active) == len(omega):
        return total, total
    keep = reachable_parameters(network, active)
    for name, p in network.named_parameters():
        p.requires_grad_(name in keep)
    return sum(p.numel() for p in network.parameters() if p.requires_grad), total
