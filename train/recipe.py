"""The training objective of the official recipe, on ComfyUI's own noise schedule.

MSE on the model's own prediction: pick t uniformly in 0..999, noise the latent with the base
model's schedule and ask the steered UNet for what the base UNet predicts: the noise for
epsilon models (SD1.5, SDXL), the velocity for v-prediction fine-tunes. The schedule is read from
the loaded model's ``model_sampling`` (1000 steps, scaled-linear betas 0.00085..0.012 for SD1.5 and
SDXL) and the UNet input is built with ComfyUI's own ``noise_scaling`` / ``calculate_input`` /
``timestep``, so a training sample is exactly what ComfyUI's sampler feeds the UNet at that noise
level; the v target is the output ComfyUI's ``V_PREDICTION.calculate_denoised`` turns back into
the clean latent. All random draws come from one CPU generator, so runs are reproducible on any
device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

#: The official generic caption, used instead of the sample's caption 1/3 of the time.
GENERIC_PROMPT = "a high-quality, detailed, and professional image"


@dataclass
class NoisedLatents:
    """One batch of training inputs and targets (CPU tensors)."""

    unet_input: torch.Tensor   # x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, what the UNet sees
    timestep: torch.Tensor     # t in 0..999 as float, what the UNet's time embedding sees
    sigma: torch.Tensor        # ComfyUI's sigma_t = sqrt((1 - a_t) / a_t)
    noise: torch.Tensor        # eps
    target: torch.Tensor       # the regression target: eps, or v for v-prediction models


def noise_latents(x0: torch.Tensor, model_sampling: Any, generator: torch.Generator | None,
                  timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> NoisedLatents:
    """Draw t (unless ``timesteps`` are given) and eps (unless ``noise`` is given) for each row of
    ``x0`` (model-space latents) and noise it. With both given, ``generator`` may be None: the
    evaluation (:mod:`train.condition_gap`) noises held-out pairs at fixed timesteps and noise."""
    sigmas = model_sampling.sigmas.detach().cpu().float()
    b = x0.shape[0]
    if timesteps is None:
        t = torch.randint(0, sigmas.shape[0], (b,), generator=generator)
    else:
        t = timesteps.long().cpu().reshape(b)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    else:
        noise = noise.detach().cpu().float().reshape(x0.shape)
    sigma = sigmas[t]
    x0 = x0.detach().cpu().float()
    noisy = model_sampling.noise_scaling(sigma, noise, x0)           # x0 + sigma * eps
    unet_input = model_sampling.calculate_input(sigma, noisy)        # / sqrt(sigma^2 + 1)
    timestep = model_sampling.timestep(sigma).float()                # back to the integer t
    target = prediction_target(model_sampling, sigma, noise, x0)
    return NoisedLatents(unet_input=unet_input, timestep=timestep, sigma=sigma, noise=noise, target=target)


def prediction_target(model_sampling: Any, sigma: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """What the UNet should output for ``x = x0 + sigma * noise``: the output from which ComfyUI's
    ``model_sampling.calculate_denoised`` recovers ``x0``.

    Epsilon models: ``noise``. V-prediction (ComfyUI's V_PREDICTION, sigma_data 1):
    ``v = (sigma_data * noise - sigma * x0 / sigma_data) / sqrt(sigma^2 + sigma_data^2)``, i.e.
    ``alpha_t * eps - sigma_t * x0`` in DDPM terms.
    """
    import comfy.model_sampling

    if isinstance(model_sampling, comfy.model_sampling.EDM) or not isinstance(model_sampling, comfy.model_sampling.EPS):
        kinds = " + ".join(c.__name__ for c in type(model_sampling).__bases__)
        raise ValueError(f"the model samples with {kinds}: only epsilon and v-prediction models are trained")
    if not isinstance(model_sampling, comfy.model_sampling.V_PREDICTION):
        return noise
    sd = float(model_sampling.sigma_data)
    s = sigma.float().reshape(sigma.shape[:1] + (1,) * (noise.ndim - 1))
    return (sd * noise - s * x0.float() / sd) / (s ** 2 + sd ** 2).sqrt()


def choose_captions(conds: Sequence[Sequence[torch.Tensor]], generic: torch.Tensor, generic_prob: float,
                    generator: torch.Generator) -> list[torch.Tensor]:
    """Per item: the generic prompt with probability ``generic_prob``, else one of its captions.

    Always draws the same numbers per item (one uniform, one index), whatever the outcome, so
    the RNG stream does not depend on the data.
    """
    chosen = []
    for item in conds:
        u = float(torch.rand((), generator=generator))
        j = int(torch.randint(0, max(1, len(item)), (), generator=generator))
        chosen.append(generic if u < generic_prob else item[j])
    return chosen


def batch_pooled(pooled: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Stack (1, 1280) pooled outputs into one batch (SDXL); None when the model takes none."""
    if not pooled or pooled[0] is None:
        return None
    return torch.cat(list(pooled), dim=0)


def batch_context(conds: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack (1, L_i, width) conditionings into one batch the way ComfyUI's sampler does.

    Prompts longer than 77 tokens give longer conditionings; like ComfyUI's CONDCrossAttn,
    shorter ones are repeated up to the least common multiple (repeating does not change the
    attention result).
    """
    import comfy.conds

    first, *rest = [comfy.conds.CONDCrossAttn(c) for c in conds]
    return first.concat(rest) if rest else first.cond


def lr_at(step: int, base_lr: float, warmup_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)
