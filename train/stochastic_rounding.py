"""bf16 trainable weights that still learn at lr 1e-5: fp32 updates, stochastically rounded.

bf16 keeps 8 significant bits, so a weight of ~1e-2 moves in steps of ~6e-5. An AdamW update of
~lr = 1e-5 is below half of that step and plain round-to-nearest puts the weight back where it
was: training stalls. Here the optimizer (any of them) runs on fp32 copies of one parameter at a
time, and the updated fp32 value is rounded to one of its two bf16 neighbours with probability
proportional to closeness, so the expected weight follows the fp32 trajectory. The dither comes
from a generator whose state is part of the optimizer's state dict, so a resumed run draws the
same dither as an uninterrupted one.

Only one parameter is in fp32 at any moment (the largest B_phi tensor is 59 MB), so the
memory is that of bf16 weights and bf16 gradients plus the optimizer's own state.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

_LOW_BITS = 1 << 16          # bits of an fp32 number that bf16 drops
_KEEP_HIGH = -_LOW_BITS      # int32 mask 0xFFFF0000


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator) -> Tensor:
    """Round fp32 ``x`` to bf16, up or down at random with probability proportional to closeness.

    Adds a uniform 16-bit dither to the bits bf16 drops and truncates: a value 30% of the way
    from one bf16 neighbour to the next lands on the upper one 30% of the time (unbiased).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic rounding takes float32 values, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    dither = torch.randint(0, _LOW_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    # Magnitude-wise rounding in sign-magnitude space: unbiased for either sign. The result's low
    # 16 bits are zero, so the cast to bf16 below is exact.
    return ((bits + dither) & _KEEP_HIGH).view(torch.float32).to(torch.bfloat16)


class StochasticRoundingOptimizer:
    """Steps bf16 parameters with an fp32 optimizer, one parameter at a time, then rounds.

    The inner optimizer is built (by ``make_inner``) over fp32 stand-ins of the bf16 parameters;
    a stand-in holds data only during its own update, so the optimizer state keeps its usual
    fp32 dtype without an fp32 copy of the whole network ever existing.

    Args:
        params: the bf16 parameters to train.
        make_inner: builds the optimizer from a list of fp32 parameters.
        seed: seed of the rounding dither.
    """

    def __init__(self, params: Iterable[Tensor], make_inner: Callable[[list[Tensor]], torch.optim.Optimizer],
                 seed: int = 0):
        self.params = list(params)
        for p in self.params:
            if p.dtype != torch.bfloat16:
                raise TypeError(f"stochastic rounding trains bf16 parameters, got one in {p.dtype}")
        device = self.params[0].device if self.params else torch.device("cpu")
        # Stand-ins live on the parameters' device so fused/foreach kernels pick the right backend.
        self._standins = [torch.nn.Parameter(torch.empty(0, device=p.device)) for p in self.params]
        self.inner = make_inner(self._standins)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's groups (the training loop sets the learning rate here)."""
        return self.inner.param_groups

    @property
    def state(self):
        """The inner optimizer's per-parameter state (keyed by the fp32 stand-ins)."""
        return self.inner.state

    @torch.no_grad()
    def step(self) -> None:
        """One optimizer step for every bf16 parameter that has a gradient."""
        for p, s in zip(self.params, self._standins):
            if p.grad is None:
                continue
            s.data = p.detach().float()
            s.grad = p.grad.detach().float()
            self.inner.step()  # the other stand-ins have no gradient: the optimizer skips them
            p.copy_(stochastic_round_to_bf16(s.data, self.generator))
            s.grad = None
            s.data = torch.empty(0, device=p.device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the bf16 parameters' gradients."""
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus the dither generator's state."""
        sd = self.inner.state_dict()
        sd["rounding_generator"] = self.generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        sd = dict(state_dict)
        gen = sd.pop("rounding_generator", None)
        if gen is None:
            raise ValueError("this optimizer state has no rounding generator: it was not written with "
                             "--weights-dtype bf16")
        # torch's loader casts floating state to its parameter's dtype: the stand-ins are fp32,
        # so the fp32 moments load unchanged.
        self.inner.load_state_dict(sd)
        self.generator.set_state(gen)
