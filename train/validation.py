"""Validation samples: fixed hints and prompts rendered with ComfyUI's sampler and the adapter.

The adapter is attached by ``nodes.steering.attach`` (the function ``attach_bps``, and so the
BPSApply node, runs) and sampled with ``comfy.sample.sample`` (what KSampler runs), so a
validation picture is what a user would get in ComfyUI at that step. The global RNG is restored afterwards: sampling must not change the
training run's random stream (resumed runs stay bit-identical).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from ..bps.network import BPSNetwork
from ..bps.ports import port_map
from ..nodes.steering import BPSAttachment, attach, model_unet_shape
from .steered_unet import training_schedule


def _conditioning(prompt: Any) -> list:
    """A ComfyUI CONDITIONING from a cached prompt (cond, pooled) or a bare conditioning tensor, as
    CLIPTextEncode builds it (the pooled output next to the tokens; SDXL's sampler needs it)."""
    cond, pooled = prompt if isinstance(prompt, tuple) else (prompt, None)
    return [[cond, {"pooled_output": pooled} if pooled is not None else {}]]


def render_samples(model: Any, vae: Any, network: BPSNetwork, omega: Sequence[float], hints: torch.Tensor,
                   positives: Sequence[Any], negative: Any, *, steps: int, cfg: float,
                   seed: int) -> list[np.ndarray]:
    """Render one image per hint; returns RGB uint8 arrays.

    Args:
        model: the frozen base ModelPatcher (a patched clone is made per sample).
        vae: ComfyUI VAE for decoding.
        network: the adapter network being trained (used read-only, no gradients).
        omega: the adapter's port weights.
        hints: (N, C, H, W) in [0, 1].
        positives: N prompts (:class:`train.cache.PromptEmbedding`, or conditionings (1, L, width));
            negative: the empty prompt, likewise.
    """
    import comfy.sample

    images = []
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    was_training = network.training
    network.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for i in range(hints.shape[0]):
                hint = hints[i:i + 1]
                # attach() is what attach_bps (the BPSApply node) runs; manage_network=False keeps
                # ComfyUI's model manager from moving or holding on to the network being trained.
                shape = model_unet_shape(model)
                attachment = BPSAttachment(network, training_schedule(omega, port_map(shape)), unet_shape=shape)
                attachment.set_hint(hint)
                patched = attach(model, attachment, manage_network=False)
                down = network.config.downscale  # 1 for a map at latent resolution
                h, w = hint.shape[-2] // down, hint.shape[-1] // down
                latent = torch.zeros((1, 4, h, w))
                noise = comfy.sample.prepare_noise(latent, seed + i)
                samples = comfy.sample.sample(patched, noise, steps, cfg, "euler", "normal",
                                              _conditioning(positives[i]), _conditioning(negative), latent,
                                              disable_pbar=True, seed=seed + i)
                pixels = vae.decode(samples)
                img = (pixels[0].float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
                images.append(img)
    finally:
        network.train(was_training)
    return images


def _hint_picture(hint: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) picture in [0, 1] of a (C, H, W) hint: grey as RGB, RGB as is, a style hint's RGB
    (its extra map left out), other maps as the grey mean over their channels, stretched to [0, 1]."""
    c = hint.shape[0]
    if c == 1:
        return hint.expand(3, -1, -1)
    if c in (3, 4):
        return hint[:3]
    mean = hint.float().mean(dim=0, keepdim=True)
    return ((mean - mean.min()) / (mean.max() - mean.min()).clamp_min(1e-8)).expand(3, -1, -1)


def save_sample_sheet(path: str | Path, hints: torch.Tensor, images: Sequence[np.ndarray]) -> Path:
    """Save hint | sample rows as one PNG."""
    rows = []
    for i, img in enumerate(images):
        hint = (_hint_picture(hints[i]).movedim(0, -1).cpu().numpy() * 255).round().astype(np.uint8)
        hint = cv2.resize(hint, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
        rows.append(np.concatenate([hint, img], axis=1))
    sheet = np.concatenate(rows, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return path
