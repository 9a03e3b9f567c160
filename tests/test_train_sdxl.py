"""The trainer on SDXL, against the real ComfyUI: detection, text conditioning, latent scale, the
prediction target (epsilon and v), the cache, and the command end to end.

Checkpoints are reduced-width SDXL files written from ComfyUI's own classes (tests/sdxl_models.py:
64-channel UNet, full CLIP-L + CLIP-G and VAE, ~1.8 GB each in fp16), one epsilon and one
v-prediction; set BPS_TEST_SDXL_DIR to a folder to keep and reuse them.
"""

from __future__ import annotations

import gc
import importlib
import os
import types
from pathlib import Path

import pytest
import torch

import comfy_host
import sdxl_models


@pytest.fixture(scope="module")
def trainer(comfyui_host):
    """The pack as the trainer imports it."""
    pack = comfy_host.trainer_entry().import_pack()
    mods = {m: importlib.import_module(f"{pack.__name__}.{m}") for m in (
        "train.base_model", "train.recipe", "train.cache", "train.random_checkpoint", "train.loop", "train.cli")}
    return types.SimpleNamespace(pack=pack, entry=comfy_host.trainer_entry(), base_model=mods["train.base_model"],
                                 recipe=mods["train.recipe"], cache=mods["train.cache"],
                                 rc=mods["train.random_checkpoint"], loop=mods["train.loop"], cli=mods["train.cli"])


@pytest.fixture(scope="module")
def sdxl_ckpts(trainer, tmp_path_factory) -> dict[str, Path]:
    folder = os.environ.get("BPS_TEST_SDXL_DIR") or tmp_path_factory.mktemp("sdxl")
    paths = sdxl_models.write_reduced_sdxl_checkpoints(trainer.rc, Path(folder))
    gc.collect()
    return paths


@pytest.fixture(scope="module")
def reduced_sdxl_detected(comfyui_host):
    with sdxl_models.registered_reduced_sdxl() as cls:
        yield cls


@pytest.fixture(scope="module")
def sdxl_bases(trainer, sdxl_ckpts, reduced_sdxl_detected):
    """Both checkpoints loaded once through the trainer's loader (ComfyUI's checkpoint loader)."""
    bases = {p: trainer.base_model.load_base_models(path, unet_dtype=torch.float32)
             for p, path in sdxl_ckpts.items()}
    yield bases
    bases.clear()
    comfy_host.release_memory()


def _node(node_id):
    import nodes as comfy_nodes
    return comfy_nodes.NODE_CLASS_MAPPINGS[node_id]


def _unet_inputs_while_sampling(model, positive, latent):
    """The keyword inputs (y, context) ComfyUI's UNet gets in one KSampler step on ``latent``."""
    import comfy.patcher_extension
    import comfy.sample

    seen = {}

    def record(executor, x, timesteps, *args, **kwargs):
        # UNetModel.forward hands its executor (x, timesteps, context, y, control, transformer_options)
        named = dict(zip(("context", "y"), args)) | kwargs
        seen.setdefault("y", named.get("y"))
        seen.setdefault("context", named.get("context"))
        return executor(x, timesteps, *args, **kwargs)

    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_record", record)
    noise = torch.zeros_like(latent)
    comfy.sample.sample(patched, noise, 1, 1.0, "euler", "normal", positive, positive, latent,
                        disable_pbar=True, seed=0)
    return seen


# ---------------------------------------------------------------------------- detection

def test_the_loader_detects_sdxl_its_prediction_type_and_latent_scale(sdxl_bases):
    for prediction, base in sdxl_bases.items():
        assert base.family == "SDXL" and base.prediction == prediction and base.takes_pooled
        assert base.latent_scale == pytest.approx(0.13025)


def test_other_parameterisations_are_refused_naming_them(trainer):
    """An SDXL file with Playground v2.5's EDM markers loads in ComfyUI, but the trainer refuses it."""
    import comfy.supported_models
    config = comfy.supported_models.SDXL(sdxl_models.reduced_sdxl_config(trainer.rc))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({"edm_mean": torch.zeros(1), "edm_std": torch.ones(1)}, device="cpu")
    with pytest.raises(trainer.base_model.BaseModelError, match=r"ModelSamplingContinuousEDM \+ EDM.*not EDM or "
                                                                   r"flow models"):
        trainer.base_model.prediction_type(model.model_sampling)


# ------------------------------------------------------------------------ conditioning

def test_prompts_and_y_are_what_cliptextencode_and_the_sampler_give(sdxl_bases):
    """encode_prompt = CLIPTextEncode's (cond, pooled_output); unet_label(pooled, size) = the y that
    ComfyUI's UNet receives when KSampler samples a latent of that size (original = target = the
    image size, crop 0), at a non-square size so height and width cannot be swapped unnoticed."""
    base = sdxl_bases["eps"]
    prompt = "a red circle on a blue square"
    got = base.encode_prompt(prompt)
    conditioning = _node("CLIPTextEncode")().encode(base.clip, prompt)[0]
    cond, extra = conditioning[0]
    assert got.cond.shape == (1, 77, 2048) and got.pooled.shape == (1, 1280)
    assert torch.equal(got.cond, cond) and torch.equal(got.pooled, extra["pooled_output"])

    latent = torch.zeros(1, 4, 8, 12)  # 64 x 96 pixels
    seen = _unet_inputs_while_sampling(base.model, conditioning, latent)
    y = base.unet_label(got.pooled, (64, 96))
    assert y.shape == (1, 2816) and seen["y"].shape == (1, 2816)
    assert torch.equal(y, seen["y"].float().cpu())
    assert not torch.equal(y, base.unet_label(got.pooled, (96, 64)))  # the size really enters y
    two = base.unet_label(torch.cat([got.pooled, got.pooled * 0]), (64, 96))
    assert torch.equal(two[:1], y) and torch.equal(two[1:, 1280:], y[:, 1280:]) and not two[1, :1280].any()


def test_cached_prompts_keep_the_pooled_output(sdxl_bases, trainer, tmp_path):
    base, cache_mod = sdxl_bases["eps"], trainer.cache
    cache = cache_mod.TrainingCache(tmp_path, cache_mod.CacheConfig(size=(64, 64), hint_channels=1,
                                                                    base_identity="x"))
    assert cache.encode_prompts(["a cat", "", "a cat"], base.encode_prompt) == 2
    for prompt in ("a cat", ""):
        want, got = base.encode_prompt(prompt), cache.load_prompt(prompt)
        assert torch.equal(got.cond, want.cond.float()) and torch.equal(got.pooled, want.pooled.float())


def test_latents_use_the_sdxl_scale(sdxl_bases):
    base = sdxl_bases["eps"]
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(base.encode_images(pixels), base.vae.encode(pixels) * 0.13025, atol=0, rtol=1e-6)


# ---------------------------------------------------------------------------- targets

def test_the_target_is_what_comfyui_turns_back_into_the_clean_latent(sdxl_bases, trainer):
    """eps models regress the noise; v models v = alpha_t eps - sigma_t x0 (DDPM terms): in both,
    ComfyUI's own calculate_denoised(sigma, target, x0 + sigma eps) gives x0 back."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    for prediction, base in sdxl_bases.items():
        ms = base.model_sampling
        noised = trainer.recipe.noise_latents(x0, ms, torch.Generator().manual_seed(1),
                                              timesteps=torch.tensor([0, 500, 999]))
        noisy = x0 + noised.sigma.view(-1, 1, 1, 1) * noised.noise
        assert torch.allclose(ms.calculate_denoised(noised.sigma, noised.target, noisy), x0, atol=1e-4)
        if prediction == "eps":
            assert torch.equal(noised.target, noised.noise)
        else:
            alpha_bar = 1 / (1 + noised.sigma.double() ** 2)
            a, s = alpha_bar.sqrt().view(-1, 1, 1, 1), (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
            v = a * noised.noise.double() - s * x0.double()
            assert torch.allclose(noised.target.double(), v, atol=1e-5)
            assert not torch.allclose(noised.target, noised.noise, atol=1e-2)
