"""Train the mini base from scratch, seeded, and cache it by its recipe.

The recipe is the trainer's objective on the trainer's noise schedule: eps-prediction MSE at
uniformly drawn timesteps of the model's own ``model_sampling`` (SD1.5's 1000 scaled-linear
betas), noised by ``train.recipe.noise_latents``, the very function the BPS trainer uses. The data
is an endless seeded stream of random shapes (``shapes.py``) through the stand-in VAE; the context
is the stand-in text encoder's constant. AdamW with a linear warm-up and a cosine decay; the file
holds an exponential moving average of the weights (sharper samples from a short run).

The result goes to ``<cache>/mini_base_<recipe hash>.safetensors`` (``~/.cache/comfyui-bps`` unless
``BPS_MINI_BASE_CACHE`` or ``cache_dir`` says otherwise), outside the repository; a file whose
recipe hash matches is reused. ComfyUI must be imported first (``train/try_mini_base.py`` and the
trainer boot it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..recipe import noise_latents
from . import shapes
from .model_file import MINI_UNET_CONFIG, build_model, read_recipe, save_mini_base
from .stand_ins import StandInTextEncoder, StandInVAE

log = logging.getLogger("bps.mini_base")

#: Bump when the training code changes what a recipe produces.
BUILD_VERSION = 2

#: The default recipe (its time on 2 CPU cores is in the README).
DEFAULT_RECIPE: dict[str, Any] = {
    "version": BUILD_VERSION,
    "unet_config": MINI_UNET_CONFIG,
    "image_size": shapes.SIZE,
    "radius_range": list(shapes.RADIUS_RANGE),
    "kinds": list(shapes.KINDS),
    "seed": 0,
    "steps": 800,
    "batch_size": 64,
    "lr": 2e-3,
    "warmup_steps": 30,
    "final_lr_fraction": 0.05,
    "ema_decay": 0.999,
    "weight_decay": 0.0,
}


def recipe_hash(recipe: dict[str, Any]) -> str:
    """Short stable hash of a recipe (its JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """Where built mini bases live: ``$BPS_MINI_BASE_CACHE`` or ``~/.cache/comfyui-bps``."""
    env = os.environ.get("BPS_MINI_BASE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "comfyui-bps"


def cached_path(recipe: dict[str, Any], cache_dir: str | Path | None = None) -> Path:
    """The file a recipe is cached in."""
    return Path(cache_dir or default_cache_dir()) / f"mini_base_{recipe_hash(recipe)}.safetensors"


def shape_batch(rng: np.random.Generator, count: int, size: int) -> torch.Tensor:
    """``count`` random shape pictures ``(count, size, size, 3)`` in [0, 1]."""
    images = [shapes.render_image(shapes.random_layout(rng), size) for _ in range(count)]
    return torch.from_numpy(np.stack(images)).float() / 255.0


def lr_at(step: int, recipe: dict[str, Any]) -> float:
    """Linear warm-up to ``lr``, then a cosine down to ``final_lr_fraction`` of it."""
    lr, warm, total = recipe["lr"], recipe["warmup_steps"], recipe["steps"]
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = recipe["final_lr_fraction"]
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_mini_base(recipe: dict[str, Any] | None = None, *, progress: bool = True):
    """Train a mini base by ``recipe`` (default :data:`DEFAULT_RECIPE`); returns the EMA ModelPatcher.

    Deterministic for a given recipe on a given machine (seeded init, data and noise; CPU).
    """
    recipe = dict(recipe or DEFAULT_RECIPE)
    torch.manual_seed(recipe["seed"])
    model = build_model(recipe["unet_config"], initialise=True)
    # Newer ComfyUI (0.33) builds its layers' parameters with requires_grad=False: a frozen UNet
    # is all it ever runs. The mini base is the one UNet this pack trains.
    unet = model.model.diffusion_model.requires_grad_(True)
    ema = copy.deepcopy(unet).requires_grad_(False)
    unet.train()
    ms = model.get_model_object("model_sampling")
    options = model.model_options["transformer_options"]  # the attention override (model_file.py)
    scale = float(model.model.latent_format.scale_factor)
    vae = StandInVAE()
    context = StandInTextEncoder(recipe["unet_config"]["context_dim"]).encode("")
    rng = np.random.default_rng(recipe["seed"] + 1)
    generator = torch.Generator().manual_seed(recipe["seed"] + 2)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=recipe["steps"], desc="mini base training", unit="step", dynamic_ncols=True)
    batch = recipe["batch_size"]
    start, smoothed = time.perf_counter(), None
    try:
        for step in range(recipe["steps"]):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, recipe)
            x0 = vae.encode(shape_batch(rng, batch, recipe["image_size"])) * scale
            noised = noise_latents(x0, ms, generator)
            eps = unet(noised.unet_input, noised.timestep, context=context.expand(batch, -1, -1),
                       transformer_options=options)
            loss = F.mse_loss(eps, noised.noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            decay = min(recipe["ema_decay"], (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), unet.parameters()):
                    e.lerp_(p, 1 - decay)
            value = loss.item()
            smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
            if bar is not None:
                bar.set_postfix(loss=f"{smoothed:.4f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    log.info("mini base trained: %d steps in %.0f s, smoothed loss %.4f", recipe["steps"],
             time.perf_counter() - start, smoothed)
    unet.load_state_dict(ema.state_dict())
    unet.eval().requires_grad_(False)
    recipe["final_loss"] = round(smoothed, 5)
    return model, recipe


def ensure_mini_base(recipe: dict[str, Any] | None = None, *, cache_dir: str | Path | None = None,
                     progress: bool = True) -> Path:
    """The cached mini base file of ``recipe``, trained and written first if there is none."""
    recipe = dict(recipe or DEFAULT_RECIPE)
    path = cached_path(recipe, cache_dir)
    if read_recipe(path) is not None:
        log.info("reusing the mini base %s", path)
        return path
    log.info("training the mini base (recipe %s); it is cached as %s", recipe_hash(recipe), path)
    model, trained = train_mini_base(recipe, progress=progress)
    trained["recipe_hash"] = recipe_hash(recipe)
    return save_mini_base(path, model, trained)
