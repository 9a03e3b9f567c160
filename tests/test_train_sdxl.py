"""The trainer on SDXL, against the real ComfyUI: detection, text conditioning, latent scale, the
prediction target (epsilon and v), the cache, and the command end to end.

Checkpoints are reduced-width SDXL files written from ComfyUI's own classes (conftest.py's
``sdxl_reduced_ckpts``, tests/sdxl_models.py: 64-channel UNet, full CLIP-L + CLIP-G and VAE, ~1.8 GB
each in fp16), one epsilon and one v-prediction; set BPS_TEST_SDXL_DIR to keep and reuse them.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import cv2
import pytest
import torch

import comfy_host
import sdxl_models

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--resolution", "64", "--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def trainer(comfyui_host, pack):
    """The pack as the trainer imports it."""
    pack = comfy_host.trainer_entry().import_pack()
    mods = {m: importlib.import_module(f"{pack.__name__}.{m}") for m in (
        "train.base_model", "train.recipe", "train.cache", "train.random_checkpoint", "train.loop", "train.cli",
        "train.steered_unet", "train.checkpointing", "bps")}
    return types.SimpleNamespace(pack=pack, entry=comfy_host.trainer_entry(), base_model=mods["train.base_model"],
                                 recipe=mods["train.recipe"], cache=mods["train.cache"],
                                 rc=mods["train.random_checkpoint"], loop=mods["train.loop"], cli=mods["train.cli"],
                                 steered=mods["train.steered_unet"], ckpt=mods["train.checkpointing"],
                                 bps=mods["bps"])


@pytest.fixture(scope="module")
def sdxl_ckpts(sdxl_reduced_ckpts) -> dict[str, Path]:
    return sdxl_reduced_ckpts


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


def _data(folder: Path, names=("a", "b"), size=(64, 192)) -> Path:
    """Plain-layout pairs; non-square (64 x 192) so the size embedding's height and width differ."""
    sys.path.insert(0, str(ROOT))
    from train.demo_data import draw_pair  # noqa: PLC0415 - plain pure module
    for i, n in enumerate(names):
        sketch, image, caption = draw_pair(i, max(size))
        (folder / "source").mkdir(parents=True, exist_ok=True)
        (folder / "target").mkdir(parents=True, exist_ok=True)
        h, w = size
        cv2.imwrite(str(folder / "source" / f"{n}.png"), cv2.resize(sketch, (w, h)))
        cv2.imwrite(str(folder / "target" / f"{n}.png"), cv2.cvtColor(cv2.resize(image, (w, h)), cv2.COLOR_RGB2BGR))
        (folder / "target" / f"{n}.txt").write_text(caption)
    return folder


# ------------------------------------------------------------------------ the real command
# First in the module: each run loads its checkpoint in its own process, before this module
# holds the two loaded checkpoints of the in-process tests.

_LAUNCH = """
import sys
sys.path[:0] = [{tests!r}, {train!r}]
import train_bps
train_bps.boot_comfyui(train_bps.find_comfyui())
import sdxl_models
with sdxl_models.registered_reduced_sdxl():
    sys.exit(train_bps.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_cli_trains_an_sdxl_adapter_the_nodes_load(trainer, sdxl_ckpts, tmp_path, prediction):
    """`train_bps.main` (the command's entry, in a subprocess in which ComfyUI's detection knows the
    reduced SDXL) on an SDXL checkpoint file: detects SDXL and its prediction type, trains on
    non-square data, writes validation samples and an adapter that records the SDXL UNet, and the
    BPSLoader node loads it."""
    data = _data(tmp_path / "data")
    out = tmp_path / "out" / f"sketch_xl_{prediction}.safetensors"
    out.parent.mkdir()
    code = _LAUNCH.format(tests=str(ROOT / "tests"), train=str(ROOT / "train"))
    cmd = [sys.executable, "-c", code, "--ckpt", str(sdxl_ckpts[prediction]), "--data", str(data), "--out",
           str(out), "--steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--save-every", "0",
           "--validate-every", "2", "--validation-steps", "1", "--validation-count", "1", "--resolution", "128",
           "--num-workers", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    kind = "epsilon" if prediction == "eps" else "v"
    assert f"at 192x64 px (SDXL, {kind}-prediction)" in log, log[-3000:]
    assert "SDXL was trained at 1024x1024" in log  # the --resolution warning
    adapter = trainer.bps.load_adapter(out)
    prov = adapter.metadata["provenance"]
    assert prov["base_family"] == "SDXL" and prov["prediction"] == prediction and prov["resolution"] == "192x64"
    assert adapter.unet_shape.family_key == "sdxl" and len(adapter.omega) == 16
    assert adapter.network.config.channel_mult == (1, 2, 4) and adapter.network.config.model_channels == 64
    run_dir = out.with_name(out.stem + "_checkpoints")
    losses = [float(r.split(",")[1]) for r in (run_dir / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(v == v and v < 1e3 for v in losses)
    sheet = cv2.imread(str(run_dir / "samples" / "step_00000002.png"))
    assert sheet is not None and sheet.shape[:2] == (64, 384)
    import folder_paths
    folder_paths.add_model_folder_path("bps", str(out.parent))
    loaded = _node("BPSLoader").execute(adapter_name=out.name).args[0]
    assert loaded.unet_shape.to_dict() == adapter.unet_shape.to_dict() and loaded.omega == adapter.omega


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


# ------------------------------------------------------------------ trainer = node, resume

def test_trainer_prediction_equals_the_bpsapply_node_under_ksampler(trainer, sdxl_bases):
    """Same network, latent, noise, timestep, prompt and hint: the trainer's steered UNet (what the loss
    sees, with y from unet_label) gives the denoised latent KSampler gets from the BPSApply-patched
    SDXL with CLIPTextEncode's conditioning, for the eps and the v model."""
    bps = trainer.bps
    for prediction, base in sdxl_bases.items():
        shape = base.unet_shape
        net = comfy_host.steering_network(bps, bps.BPSConfig.for_unet(shape))
        omega = trainer.steered.training_omega("paper", bps.port_map(shape))
        g = torch.Generator().manual_seed(2)
        latent = torch.randn(1, 4, 8, 12, generator=g) * 5       # ComfyUI latent space, 64 x 96 px
        hint = (torch.rand(1, 1, 64, 96, generator=g) > 0.8).float()
        prompt = base.encode_prompt("a blue star on a beige background")
        ms = base.model_sampling
        x0 = base.model.model.process_latent_in(latent)
        noised = trainer.recipe.noise_latents(x0, ms, torch.Generator().manual_seed(3))
        t = int(noised.timestep)
        module = trainer.steered.SteeredUNet(net, base.model, omega)
        with torch.no_grad():
            pred = module(noised.unet_input, noised.timestep, prompt.cond, hint,
                          y=base.unet_label(prompt.pooled, (64, 96)))
        denoised_train = ms.calculate_denoised(noised.sigma, pred, x0 + noised.sigma * noised.noise)
        del module
        comfy_host.release_memory()
        adapter = bps.Adapter(net, omega, net.config, {}, None, "sketch", shape)
        patched = _node("BPSApply").execute(base.model, adapter, hint.movedim(1, -1).repeat(1, 1, 1, 3),
                                            1.0, 0.0, 1.0).args[0]
        conditioning = [[prompt.cond, {"pooled_output": prompt.pooled}]]
        node = _denoised_in_one_step(patched, latent, noised.noise, t, conditioning)
        plain = _denoised_in_one_step(base.model, latent, noised.noise, t, conditioning)
        scale = float(node.abs().max())
        assert float((denoised_train - node).abs().max()) < 1e-4 * scale, prediction
        assert float((node - plain).abs().max()) > 1e-3 * scale, prediction  # not vacuous
        del net, adapter, patched
        comfy_host.release_memory()


def _denoised_in_one_step(model, latent, noise, t: int, conditioning) -> torch.Tensor:
    """KSampler's denoised latent (model space) at timestep t: one euler step from sigma_t, cfg 1."""
    import comfy.sample
    sigma = model.get_model_object("model_sampling").sigmas[t]
    got = {}

    def callback(step, x0, x, total):
        got["x0"] = x0.clone()
    comfy.sample.sample(model, noise, 1, 1.0, "euler", "normal", conditioning, conditioning, latent,
                        sigmas=torch.stack([sigma, torch.zeros(())]), callback=callback, disable_pbar=True, seed=0)
    return got["x0"]


def test_an_interrupted_and_resumed_sdxl_run_equals_the_straight_one_bit_for_bit(trainer, sdxl_bases, tmp_path):
    """v-prediction SDXL, 2 steps of 2 accumulated batches: straight == Ctrl-C after step 1 + --resume."""
    entry, loop, base = trainer.entry, trainer.loop, sdxl_bases["v"]
    data = _data(tmp_path / "data", names=("a", "b", "c"))
    common = ["--ckpt", str(base.path), "--data", str(data), "--steps", "2", "--batch-size", "1", "--grad-accum",
              "2", "--lr", "1e-4", "--save-every", "0", "--cache-dir", str(tmp_path / "cache"), "--seed", "7", *FAST]
    got = {}

    def keep(name):
        return lambda net: got.__setitem__(name, comfy_host.network_digest(net))

    straight = tmp_path / "straight.safetensors"
    assert entry.main(common + ["--out", str(straight)], base=base, hooks=loop.Hooks(on_train_end=keep("a"))) == 0

    def ctrl_c_after_first_step(step, loss):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    split = tmp_path / "split.safetensors"
    assert entry.main(common + ["--out", str(split)], base=base,
                      hooks=loop.Hooks(on_step_end=ctrl_c_after_first_step)) == 130
    assert entry.main(common + ["--out", str(split), "--resume"], base=base,
                      hooks=loop.Hooks(on_train_end=keep("b"))) == 0
    assert got["a"] == got["b"]
    a, b = (p.with_name(p.stem + "_checkpoints") / "loss.csv" for p in (straight, split))
    assert [r.split(",")[:2] for r in a.read_text().splitlines()] == [r.split(",")[:2] for r in
                                                                      b.read_text().splitlines()]
    comfy_host.release_memory()


def test_the_trainer_accepts_sd15_and_sdxl_and_names_what_it_refuses(trainer):
    """Full-size models on the meta device (no memory): SD1.5 (any width) and SDXL are trained for;
    inpainting models, KOALA-700M (no middle block) and SD2.x are refused with the reason."""
    import comfy.model_patcher
    import comfy.supported_models
    rc, bm = trainer.rc, trainer.base_model

    def model(cls, config):
        c = getattr(comfy.supported_models, cls)(dict(config))
        with torch.device("meta"):
            m = c.get_model({})
        return comfy.model_patcher.ModelPatcher(m, load_device="cpu", offload_device="cpu")

    assert bm.base_family(model("SD15", rc.SD15_UNET_CONFIG)) == "SD1.5"
    assert bm.base_family(model("SD15", {**rc.SD15_UNET_CONFIG, "model_channels": 32})) == "SD1.5"
    assert bm.base_family(model("SDXL", rc.SDXL_UNET_CONFIG)) == "SDXL"
    refusals = {
        ("SDXL", "inpaint"): (rc.sdxl_unet_config(in_channels=9), r"SDXL inpainting model \(9 input channels\): train "
                                                                   r"the adapter on the SDXL base model"),
        ("KOALA_700M", ""): (rc.sdxl_unet_config(num_res_blocks=[1, 1, 1], transformer_depth=[0, 2, 5],
                                                 transformer_depth_output=[0, 0, 2, 2, 5, 5],
                                                 transformer_depth_middle=-2), r"KOALA_700M.*no middle block"),
        ("SD20", ""): ({**rc.SD15_UNET_CONFIG, "context_dim": 1024}, r"SD2\.x.*trained for Stable Diffusion 1\.5 or "
                                                                      r"SDXL"),
    }
    for (cls, _), (config, message) in refusals.items():
        with pytest.raises(bm.BaseModelError, match=message):
            bm.base_family(model(cls, config))
