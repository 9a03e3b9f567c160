"""train/condition_gap.py: own- against swapped-condition eps-MSE, on cases whose answer is known.

* an oracle whose eps is exact when it is given the pair's own condition: own 0, swapped large,
  a significant gap; the base (eps = 0) at 1;
* a real random SD1.5 (ComfyUI's classes) steered through the Apply BPS attach code by a fresh
  adapter, whose zero-initialised output convs make every residual 0: own, swapped and base equal
  bit for bit, and the verdict says there is no evidence the condition is used;
* the same adapter with non-zero convs: the three differ, and "swapped" is "own" with the
  conditions permuted by the plan's derangement.
"""

from __future__ import annotations

import math

import pytest
import torch

import comfy_host


@pytest.fixture(scope="module")
def gap(comfyui_host):
    import importlib
    pack = comfy_host.trainer_pack()
    return importlib.import_module(f"{pack.__name__}.train.condition_gap")


@pytest.fixture(scope="module")
def model_sampling(sd15):
    return sd15.get_model_object("model_sampling")


def test_plan_fixes_timesteps_noise_and_a_derangement(gap):
    plan = gap.GapPlan(per_band=2, seed=3)
    assert plan.timesteps == (62, 187, 312, 437, 562, 687, 812, 937)
    assert plan.band_timesteps((0, 250)) == (62, 187)
    assert torch.equal(plan.noise(3, (4, 8, 8)), gap.GapPlan(per_band=2, seed=3).noise(3, (4, 8, 8)))
    assert not torch.equal(plan.noise(3, (4, 8, 8)), gap.GapPlan(per_band=2, seed=4).noise(3, (4, 8, 8)))
    for n in (2, 3, 7, 50):
        swap = plan.derangement(n)
        assert sorted(swap) == list(range(n)), "a permutation of the pairs"
        assert all(swap[i] != i for i in range(n)), "no pair keeps its own condition"
    assert plan.derangement(7) == gap.GapPlan(per_band=2, seed=3).derangement(7)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        plan.derangement(1)
    with pytest.raises(ValueError, match="band"):
        gap.GapPlan(bands=((500, 400),))
    with pytest.raises(ValueError, match="per_band"):
        gap.GapPlan(per_band=0)


def _oracle(model_sampling, latents: torch.Tensor):
    """A steered model that reads the clean latent off its hint (the hint is the pair's index) and
    returns the exact noise: perfect with the pair's own condition, wrong with any other."""
    def steered(hint, x, timestep, context):
        index = hint[:, 0, 0, 0].round().long()
        sigma = model_sampling.sigma(timestep).view(-1, 1, 1, 1)
        noisy = x * (sigma ** 2 + 1).sqrt()      # undo calculate_input
        return (noisy - latents[index]) / sigma  # noise_scaling: noisy = x0 + sigma * eps
    return steered


def test_oracle_condition_gives_a_significant_gap(gap, model_sampling):
    torch.manual_seed(0)
    n = 6
    latents = torch.randn(n, 4, 8, 8)
    hints = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 64, 64).contiguous()
    contexts = torch.zeros(1, 77, 768)
    result = gap.measure_condition_gap(_oracle(model_sampling, latents), lambda x, t, c: torch.zeros_like(x),
                                       latents, hints, contexts, model_sampling, plan=gap.GapPlan(per_band=1),
                                       batch_size=5)
    assert result.own.abs().max() < 1e-8, "own condition: the exact noise"
    assert torch.allclose(result.base.float(), result.own.new_ones(()).float().expand_as(result.base), atol=0.6)
    assert result.swapped.min() > 1e-3, "another pair's condition cannot be exact"
    assert result.uses_condition and result.overall.own_better == 1.0
    assert result.verdict().startswith("yes")
    assert [b.label for b in result.bands] == ["0-250", "250-500", "500-750", "750-1000"]
    # at low noise a wrong clean latent costs most (divided by a small sigma)
    assert result.bands[0].swapped.mean > result.bands[-1].swapped.mean
    table = result.table()
    assert table.count("\n| ") == 5 and "all" in table
    summary = result.to_dict()
    assert summary["uses_condition"] is True and len(summary["per_pair"]["own"]) == n
    assert summary["overall"]["gap"]["ci95"] > 0


def test_input_mismatches_are_named(gap, model_sampling):
    latents, hints = torch.zeros(3, 4, 8, 8), torch.zeros(2, 1, 64, 64)
    with pytest.raises(ValueError, match="hints must be"):
        gap.measure_condition_gap(None, None, latents, hints, torch.zeros(1, 77, 768), model_sampling)
    with pytest.raises(ValueError, match="2 text contexts for 3 pairs"):
        gap.measure_condition_gap(None, None, latents, torch.zeros(3, 1, 64, 64), torch.zeros(2, 77, 768),
                                  model_sampling)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        gap.measure_condition_gap(None, None, latents[:1], hints[:1], torch.zeros(1, 77, 768), model_sampling)
    with pytest.raises(ValueError, match="precomputed base errors"):
        gap.measure_condition_gap(None, torch.zeros(3, 5), latents, torch.zeros(3, 1, 64, 64),
                                  torch.zeros(1, 77, 768), model_sampling)


def test_zero_adapter_on_real_sd15_gives_no_gap_bit_for_bit_then_a_real_one_gives_one(gap, sd15, model_sampling):
    import importlib
    bps = importlib.import_module(f"{comfy_host.trainer_pack().__name__}.bps")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        network = bps.BPSNetwork(bps.BPSConfig()).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    n = 2  # a full-width SD1.5 UNet and B_phi on CPU: keep the calls few (2 pairs x 2 timesteps)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    hints = torch.rand(n, 1, 64, 64, generator=g)
    contexts = torch.randn(n, 77, 768, generator=g)
    plan = gap.GapPlan(bands=((0, 500), (500, 1000)), per_band=1, seed=5)
    steered, base = gap.comfy_forwards(sd15, network, list(bps.PAPER_OMEGA))
    done = []
    zero = gap.measure_condition_gap(steered, base, latents, hints, contexts, model_sampling, plan=plan,
                                     batch_size=4, progress=done.append)
    assert sum(done) == 3 * n * len(plan.timesteps)
    assert torch.equal(zero.own, zero.base) and torch.equal(zero.swapped, zero.base)
    assert zero.overall.gap.mean == 0.0 and zero.overall.gain.mean == 0.0
    assert not zero.uses_condition and zero.verdict().startswith("no evidence")
    assert all(math.isfinite(b.base.mean) and b.base.mean > 0 for b in zero.bands)

    # The same network with its zero convs filled: residuals now depend on the hint.
    with torch.no_grad():
        for p in network.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p[0].numel() ** 0.5))
    real = gap.measure_condition_gap(steered, zero.base, latents, hints, contexts, model_sampling, plan=plan,
                                     batch_size=4)
    assert torch.equal(real.base, zero.base), "precomputed base errors are used as given"
    assert not torch.equal(real.own, real.base) and not torch.equal(real.own, real.swapped)
    # "swapped" is "own" of the pairs with their conditions permuted by the plan's derangement
    permuted = gap.eps_errors(lambda rows, x, t, c: steered(hints[[real.swap[r] for r in rows]], x, t, c),
                              latents, contexts, model_sampling, plan, batch_size=4)
    assert torch.equal(permuted, real.swapped)
