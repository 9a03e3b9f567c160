"""Does an adapter use its condition? eps-MSE with each pair's own condition against a swapped one.

An adapter can lower the training loss without looking at its condition at all: on a base that
has not learned the data (a random SD1.5, an undertrained model) B_phi learns to cancel the
base's own error, whatever sketch it is shown. The one question that separates "steers" from
"fits the base" is whether the error with a pair's *own* condition is lower than with *another*
pair's condition. This module measures that, on pairs the caller chooses (held-out pairs for an
evaluation, a few training pairs for the trainer's validation):

* every pair is noised at the same fixed timesteps (a few per timestep band) with the same fixed
  noise (seeded), exactly as the trainer noises a latent (:func:`train.recipe.noise_latents`, on
  the model's own ``model_sampling``);
* the eps-MSE is computed for the base alone, for the steered model given each pair's own
  condition, and for the steered model given a swapped condition: a derangement of the
  conditions (no pair keeps its own), so every pair is compared with itself;
* per band (0-250, 250-500, 500-750, 750-1000 by default) and overall, the mean and spread over
  pairs of each, and of the paired gap ``swapped - own`` with a 95% confidence interval (normal
  approximation, ``1.96 * std / sqrt(pairs)``).

It is written against two plain callables, so it works on any base and any steering code:

* ``steered(hint, x, timestep, context) -> eps`` (the signature of
  ``nodes.steering.SteeredForward``; ``hint`` is ``(B, C, H, W)`` in [0, 1]);
* ``base(x, timestep, context) -> eps``.

``x`` is the UNet input (already scaled), ``timestep`` the UNet timesteps (float, 0..999). For a
ComfyUI MODEL and a BPS network, :func:`comfy_forwards` builds both through the Apply BPS attach
code. Typical use::

    steered, base = comfy_forwards(model, network, omega)
    gap = measure_condition_gap(steered, base, latents, hints, contexts,
                                model.get_model_object("model_sampling"))
    print(gap.table()); print(gap.verdict())

With an adapter whose residuals are all zero, own, swapped and base are equal bit for bit (the
tests check this), so any gap is the adapter's doing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .recipe import noise_latents

#: (hint, x, timestep, context) -> eps: the steered UNet (SteeredForward's signature).
SteeredEps = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
#: (x, timestep, context) -> eps: the base UNet alone.
BaseEps = Callable[[Tensor, Tensor, Tensor], Tensor]
#: Called with the number of (pair, timestep) items just done (a tqdm's ``update`` fits).
Progress = Callable[[int], Any]

#: Timestep bands [lo, hi) of the report: low noise (detail) to high noise (layout).
DEFAULT_BANDS: tuple[tuple[int, int], ...] = ((0, 250), (250, 500), (500, 750), (750, 1000))
#: Two-sided 95% quantile of the normal distribution.
Z95 = 1.959964


@dataclass(frozen=True)
class GapPlan:
    """Where and how the pairs are noised: fixed timesteps per band, fixed noise, fixed swap.

    Attributes:
        bands: timestep bands ``[lo, hi)``, within 0..1000.
        per_band: timesteps per band, evenly spaced at the centres of ``per_band`` equal slices.
        seed: seed of the noise and of the derangement.
    """

    bands: tuple[tuple[int, int], ...] = DEFAULT_BANDS
    per_band: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.per_band < 1:
            raise ValueError(f"per_band must be at least 1, got {self.per_band}")
        if not self.bands:
            raise ValueError("at least one timestep band is needed")
        for lo, hi in self.bands:
            if not 0 <= lo < hi <= 1000 or hi - lo < self.per_band:
                raise ValueError(f"timestep band [{lo}, {hi}) must lie in [0, 1000) and hold at least "
                                 f"{self.per_band} timesteps")

    @property
    def timesteps(self) -> tuple[int, ...]:
        """All fixed timesteps, band by band."""
        return tuple(t for band in self.bands for t in self.band_timesteps(band))

    def band_timesteps(self, band: tuple[int, int]) -> tuple[int, ...]:
        """The fixed timesteps inside one band."""
        lo, hi = band
        return tuple(int(lo + (hi - lo) * (k + 0.5) / self.per_band) for k in range(self.per_band))

    def noise(self, pairs: int, latent_shape: Sequence[int]) -> Tensor:
        """Fixed noise ``(pairs, timesteps, *latent_shape)``: the same for every model compared."""
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn((pairs, len(self.timesteps), *latent_shape), generator=gen, dtype=torch.float32)

    def derangement(self, pairs: int) -> list[int]:
        """``swap[i]``: the pair whose condition pair ``i`` gets instead of its own (never ``i``).

        A seeded random cycle through all pairs, so no pair keeps its own condition.
        """
        if pairs < 2:
            raise ValueError(f"swapping conditions needs at least 2 pairs, got {pairs}")
        order = torch.randperm(pairs, generator=torch.Generator().manual_seed(self.seed + 1)).tolist()
        swap = [0] * pairs
        for k, i in enumerate(order):
            swap[i] = order[(k + 1) % pairs]
        return swap


@dataclass(frozen=True)
class Spread:
    """Mean over pairs, sample standard deviation, and the half-width of the mean's 95% CI."""

    mean: float
    std: float
    ci95: float

    @staticmethod
    def of(values: Tensor) -> "Spread":
        """Spread of a 1-D tensor of per-pair values."""
        v = values.double().reshape(-1)
        n = v.numel()
        std = float(v.std(unbiased=True)) if n > 1 else float("nan")
        return Spread(float(v.mean()), std, Z95 * std / math.sqrt(n) if n > 1 else float("nan"))

    def to_dict(self) -> dict[str, float]:
        """JSON-ready."""
        return {"mean": self.mean, "std": self.std, "ci95": self.ci95}


@dataclass(frozen=True)
class BandGap:
    """The comparison inside one timestep band (or over all of them).

    Attributes:
        band: ``(lo, hi)``; ``(0, 1000)`` style for the overall row.
        timesteps: the fixed timesteps averaged per pair.
        pairs: number of pairs.
        base, own, swapped: eps-MSE spreads over pairs.
        gap: per-pair ``swapped - own``: > 0 when the adapter's own condition fits better.
        gain: per-pair ``base - own``: > 0 when steering lowers the error (with or without using the
            condition: compare with ``gap``).
        own_better: fraction of pairs whose own condition gives the lower error.
    """

    band: tuple[int, int]
    timesteps: tuple[int, ...]
    pairs: int
    base: Spread
    own: Spread
    swapped: Spread
    gap: Spread
    gain: Spread
    own_better: float

    @property
    def label(self) -> str:
        """``"0-250"`` style."""
        return f"{self.band[0]}-{self.band[1]}"

    @property
    def significant(self) -> bool:
        """The gap's 95% CI lies above 0."""
        return math.isfinite(self.gap.ci95) and self.gap.mean - self.gap.ci95 > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"band": list(self.band), "timesteps": list(self.timesteps), "pairs": self.pairs,
                "base": self.base.to_dict(), "own": self.own.to_dict(), "swapped": self.swapped.to_dict(),
                "gap": self.gap.to_dict(), "gain": self.gain.to_dict(), "own_better": self.own_better,
                "significant": self.significant}


def _band_gap(band: tuple[int, int], timesteps: tuple[int, ...], columns: list[int], base: Tensor, own: Tensor,
              swapped: Tensor) -> BandGap:
    b, o, s = (m[:, columns].double().mean(dim=1) for m in (base, own, swapped))
    return BandGap(band, timesteps, int(o.numel()), Spread.of(b), Spread.of(o), Spread.of(s), Spread.of(s - o),
                   Spread.of(b - o), float((o < s).double().mean()))


@dataclass
class ConditionGap:
    """Result of :func:`measure_condition_gap`.

    Attributes:
        plan: the timesteps, noise seed and swap used.
        swap: ``swap[i]`` = the pair whose condition pair ``i`` was given in the swapped run.
        bands: one :class:`BandGap` per band of the plan.
        overall: the same over all timesteps.
        base, own, swapped: per-pair, per-timestep eps-MSE ``(pairs, timesteps)``.
    """

    plan: GapPlan
    swap: list[int]
    bands: list[BandGap]
    overall: BandGap
    base: Tensor = field(repr=False)
    own: Tensor = field(repr=False)
    swapped: Tensor = field(repr=False)

    @property
    def uses_condition(self) -> bool:
        """Own-condition error below swapped-condition error, the 95% CI of the gap above 0."""
        return self.overall.significant

    def verdict(self) -> str:
        """One sentence answering "does this adapter use its condition?"."""
        o = self.overall
        gap = f"swapped - own = {o.gap.mean:.5f} ± {o.gap.ci95:.5f} (95% CI, {o.pairs} pairs)"
        if self.uses_condition:
            return (f"yes: the adapter uses its condition; the eps-MSE with each pair's own condition "
                    f"({o.own.mean:.5f}) is below that with a swapped one ({o.swapped.mean:.5f}), {gap}, own "
                    f"lower for {o.own_better:.0%} of pairs")
        if math.isfinite(o.gap.ci95) and o.gap.mean + o.gap.ci95 < 0:
            return (f"no: a swapped condition fits better than each pair's own ({gap}); are the held-out pairs "
                    f"of the kind this adapter was trained on (same condition type, same polarity)?")
        text = (f"no evidence that the adapter uses its condition: own ({o.own.mean:.5f}) and swapped "
                f"({o.swapped.mean:.5f}) conditions give the same eps-MSE within the spread, {gap}")
        if math.isfinite(o.gain.ci95) and o.gain.mean - o.gain.ci95 > 0:
            text += (f"; it does lower the error against the base alone ({o.base.mean:.5f}) whatever condition "
                     f"it is given: it learned the base's error, not the condition")
        return text

    def table(self) -> str:
        """The per-band table as aligned text (markdown-compatible)."""
        head = ("| t band | base eps-MSE | own cond. | swapped cond. | gap swapped-own (95% CI) | own better |"
                "\n|---|---|---|---|---|---|")
        rows = []
        for b in [*self.bands, self.overall]:
            name = "all" if b is self.overall else b.label
            mark = " *" if b.significant else ""
            rows.append(f"| {name} | {b.base.mean:.5f} ± {b.base.std:.5f} | {b.own.mean:.5f} ± {b.own.std:.5f} | "
                        f"{b.swapped.mean:.5f} ± {b.swapped.std:.5f} | {b.gap.mean:+.5f} ± {b.gap.ci95:.5f}{mark} | "
                        f"{b.own_better:.0%} |")
        return head + "\n" + "\n".join(rows) + "\n(± after an eps-MSE: std over pairs; * : gap CI above 0)"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary, per-pair values included."""
        return {"plan": {"bands": [list(b) for b in self.plan.bands], "per_band": self.plan.per_band,
                         "seed": self.plan.seed, "timesteps": list(self.plan.timesteps)},
                "swap": list(self.swap), "uses_condition": self.uses_condition, "verdict": self.verdict(),
                "bands": [b.to_dict() for b in self.bands], "overall": self.overall.to_dict(),
                "per_pair": {"base": self.base.tolist(), "own": self.own.tolist(), "swapped": self.swapped.tolist()}}


# ----------------------------------------------------------------------------- measuring

def _context_rows(contexts: Tensor | Sequence[Tensor], rows: list[int]) -> Tensor:
    if isinstance(contexts, Tensor):
        return contexts.expand(len(rows), -1, -1) if contexts.shape[0] == 1 else contexts[rows]
    from .recipe import batch_context  # prompts of different lengths: ComfyUI's own padding (needs ComfyUI)
    return batch_context([contexts[r] for r in rows])


def _check_inputs(latents: Tensor, contexts: Tensor | Sequence[Tensor], hints: Tensor | None) -> None:
    n = latents.shape[0]
    if latents.ndim != 4 or n == 0:
        raise ValueError(f"latents must be (pairs, channels, h, w) with at least one pair, got {tuple(latents.shape)}")
    m = contexts.shape[0] if isinstance(contexts, Tensor) else len(contexts)
    if m not in (1, n):
        raise ValueError(f"{m} text contexts for {n} pairs: give one per pair, or one for all")
    if hints is not None and (hints.ndim != 4 or hints.shape[0] != n):
        raise ValueError(f"hints must be (pairs, C, H, W) with one per pair ({n}), got {tuple(hints.shape)}")


def eps_errors(forward: Callable[[list[int], Tensor, Tensor, Tensor], Tensor], latents: Tensor,
               contexts: Tensor | Sequence[Tensor], model_sampling: Any, plan: GapPlan, *, batch_size: int = 8,
               progress: Progress | None = None) -> Tensor:
    """eps-MSE of ``forward`` for every pair at every fixed timestep of ``plan``: ``(pairs, timesteps)``.

    Args:
        forward: ``(rows, x, timestep, context) -> eps``; ``rows`` are the pair indices of the batch
            (so the caller can pick each row's condition).
        latents: model-space latents ``(pairs, 4, h, w)`` (what the trainer caches).
        contexts: text conditioning, a tensor ``(pairs or 1, L, D)`` or one ``(1, L_i, D)`` per pair.
        model_sampling: the model's ComfyUI ``model_sampling`` (sigmas, noise_scaling...).
        plan: timesteps, noise seed.
        batch_size: (pair, timestep) items per UNet call. The items are visited in the same order
            and batches whatever ``forward`` is, so two forwards that compute the same function
            give bit-identical errors.
        progress: called with the number of items done after each batch.
    """
    n, steps = latents.shape[0], plan.timesteps
    noise = plan.noise(n, latents.shape[1:])
    items = [(i, j) for i in range(n) for j in range(len(steps))]
    errors = torch.empty((n, len(steps)), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(items), max(1, batch_size)):
            chunk = items[start:start + max(1, batch_size)]
            rows = [i for i, _ in chunk]
            noised = noise_latents(latents[rows].float(), model_sampling, None,
                                   timesteps=torch.tensor([steps[j] for _, j in chunk]),
                                   noise=torch.stack([noise[i, j] for i, j in chunk]))
            eps = forward(rows, noised.unet_input, noised.timestep, _context_rows(contexts, rows))
            err = (eps.detach().float().cpu() - noised.noise).pow(2).flatten(1).mean(dim=1)
            for (i, j), e in zip(chunk, err.tolist()):
                errors[i, j] = e
            if progress is not None:
                progress(len(chunk))
    return errors


def base_errors(base: BaseEps, latents: Tensor, contexts: Tensor | Sequence[Tensor], model_sampling: Any,
                plan: GapPlan, *, batch_size: int = 8, progress: Progress | None = None) -> Tensor:
    """eps-MSE of the base alone ``(pairs, timesteps)``; fixed for a frozen base, so callers that
    measure repeatedly (the trainer's validation) compute it once and pass it on."""
    _check_inputs(latents, contexts, None)
    return eps_errors(lambda rows, x, t, c: base(x, t, c), latents, contexts, model_sampling, plan,
                      batch_size=batch_size, progress=progress)


def measure_condition_gap(steered: SteeredEps, base: BaseEps | Tensor, latents: Tensor, hints: Tensor,
                          contexts: Tensor | Sequence[Tensor], model_sampling: Any, *, plan: GapPlan | None = None,
                          batch_size: int = 8, progress: Progress | None = None) -> ConditionGap:
    """Base alone, own condition and swapped condition eps-MSE on the same pairs, noise and timesteps.

    Args:
        steered: ``(hint, x, timestep, context) -> eps`` of the steered UNet.
        base: ``(x, timestep, context) -> eps`` of the base UNet, or its errors from
            :func:`base_errors` with the same pairs and plan.
        latents: model-space latents ``(pairs, 4, h, w)``, at least 2 pairs.
        hints: each pair's condition ``(pairs, C, H, W)`` in [0, 1].
        contexts: text conditioning ``(pairs or 1, L, D)``, or one ``(1, L_i, D)`` per pair.
        model_sampling: the base model's ComfyUI ``model_sampling``.
        plan: bands, timesteps per band, seed (default :class:`GapPlan`).
        batch_size: (pair, timestep) items per UNet call.
        progress: called with the number of items done (3 x pairs x timesteps in all, 2 x when
            ``base`` is given as errors).

    Raises:
        ValueError: fewer than 2 pairs, or inputs whose pair counts disagree.
    """
    plan = plan or GapPlan()
    _check_inputs(latents, contexts, hints)
    n = latents.shape[0]
    swap = plan.derangement(n)
    if isinstance(base, Tensor):
        if tuple(base.shape) != (n, len(plan.timesteps)):
            raise ValueError(f"precomputed base errors are {tuple(base.shape)}, expected ({n}, "
                             f"{len(plan.timesteps)}) for these pairs and this plan")
        base_err = base.double()
    else:
        base_err = base_errors(base, latents, contexts, model_sampling, plan, batch_size=batch_size,
                               progress=progress)
    own = eps_errors(lambda rows, x, t, c: steered(hints[rows], x, t, c), latents, contexts, model_sampling, plan,
                     batch_size=batch_size, progress=progress)
    swapped = eps_errors(lambda rows, x, t, c: steered(hints[[swap[r] for r in rows]], x, t, c), latents, contexts,
                         model_sampling, plan, batch_size=batch_size, progress=progress)
    bands, column = [], 0
    for band in plan.bands:
        ts = plan.band_timesteps(band)
        bands.append(_band_gap(band, ts, list(range(column, column + len(ts))), base_err, own, swapped))
        column += len(ts)
    overall = _band_gap((plan.bands[0][0], plan.bands[-1][1]), plan.timesteps, list(range(column)), base_err, own,
                        swapped)
    return ConditionGap(plan, swap, bands, overall, base_err, own, swapped)


def comfy_base_forward(model: Any) -> BaseEps:
    """``base(x, timestep, context) -> eps`` of a ComfyUI MODEL's UNet alone, run the way the sampler
    runs it (its transformer_options and wrappers); loads the model through ComfyUI's model
    management first, so it may be called between steered calls. Inputs go to the UNet's device."""
    import comfy.model_management

    from ..nodes import steering

    device = comfy.model_management.get_torch_device()

    def base(x: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        comfy.model_management.load_models_gpu([model])
        return steering.steered_unet_forward(model, x.to(device), timestep.to(device), context.to(device))

    return base


def comfy_forwards(model: Any, network: Any, omega: Sequence[float],
                   unet_shape: Any = None) -> tuple[SteeredEps, BaseEps]:
    """``(steered, base)`` for a ComfyUI MODEL and a BPS network, through the Apply BPS attach code.

    ``steered`` is ``nodes.steering.SteeredForward`` (the trainer's forward: the residuals added by
    the same wrapper and markers the node uses, weights ``omega`` at every timestep); ``base`` is
    :func:`comfy_base_forward`. Both load the model through ComfyUI's model management first, so
    they may be called in any order. Inputs go to the UNet's device; the network must already be
    where it should compute. ``unet_shape``: the UNet the network was built for (an adapter's
    ``unet_shape``; default: the model's own), so an adapter for another UNet is refused.
    """
    import comfy.model_management

    from ..nodes import steering

    runner = steering.SteeredForward(model, network, omega, unet_shape)
    device = comfy.model_management.get_torch_device()

    def steered(hint: Tensor, x: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        net_param = next(network.parameters())
        return runner(hint.to(net_param.device, net_param.dtype), x.to(device), timestep.to(device),
                      context.to(device))

    return steered, comfy_base_forward(model)
