"""An official BPS-v1-1 sketch checkpoint, end to end: converted with the command line, loaded by
BPSLoader and applied by BPSApply in a real ComfyUI server, it reproduces the official steered
sampling; strength 0 is the unsteered model bit for bit; an adapter no IMAGE can feed is refused
by its prompt while the server keeps serving.

The official checkpoint has the official size (every key and shape from the official key list,
random weights, 2.8 GB in fp32), saved as the official training code saves it: a Lightning
``.ckpt``. The reference is computed in this process with ComfyUI's own sampler on the same SD1.5
checkpoint, seed and CFG, the UNet run by hand with the official port outputs (computed from the
official state dict, res_weights applied) added after every ResBlock and SpatialTransformer.
Small: 64x64 pixels (8x8 latents), 2 euler steps.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import comfy_host
from comfy_server import ComfyServer, PromptFailed
from official_checkpoints import PREFIX, lightning_checkpoint, official_state_dict
from official_forward import reference_steered_unet

ROOT = Path(__file__).resolve().parents[1]
SIZE, STEPS, CFG, SEED = 64, 2, 7.0, 42
POSITIVE, NEGATIVE = "a red circle on a white background", "blurry"

pytestmark = pytest.mark.usefixtures("official_keys")


def _hint_png(path: Path) -> torch.Tensor:
    """A grey sketch (R = G = B, so the node's luminance is the official 1-channel hint) written as a
    PNG; returns the official hint (1, 1, SIZE, SIZE) in [0, 1] as LoadImage will read it."""
    import cv2
    rng = np.random.default_rng(5)
    grey = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(grey, (32, 32), 18, 255, 2)
    grey = np.maximum(grey, (rng.random((SIZE, SIZE)) * 60).astype(np.uint8))  # texture: every pixel counts
    cv2.imwrite(str(path), np.repeat(grey[:, :, None], 3, axis=2))
    return torch.from_numpy(grey).float().div(255.0)[None, None]


@pytest.fixture(scope="module")
def official(comfyui_host, tmp_path_factory):
    """The official-size sketch checkpoint, converted with `python -m bps.convert_official --dtype fp32`."""
    tmp = tmp_path_factory.mktemp("official_full")
    ckpt = tmp / "bps_sketch_official.ckpt"
    control = official_state_dict("sketch", scale=1, seed=11)
    torch.save(lightning_checkpoint(control), ckpt)
    del control
    gc.collect()
    adapter = tmp / "bps_sketch.safetensors"
    convert = subprocess.run([sys.executable, "-m", "bps.convert_official", str(ckpt), str(adapter), "--dtype", "fp32"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert convert.returncode == 0, convert.stderr
    assert "kept 232 tensors (672,093,120 numbers)" in convert.stdout and "dropped 22 tensors" in convert.stdout
    yield {"ckpt": ckpt, "adapter": adapter, "report": convert.stdout}
    ckpt.unlink(missing_ok=True)
    adapter.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def reference(official, sd15_ckpt, tmp_path_factory):
    """The official steered sampling, computed in this process (then every model is released)."""
    import comfy.sample
    import comfy.sd

    hint = _hint_png(tmp_path_factory.mktemp("hint") / "probe.png")
    # mmap: the official tensors stay in the page cache, not in this process's heap
    sd = torch.load(official["ckpt"], map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    sd = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(sd15_ckpt), output_vae=False, output_clip=True)
    unet = model.model.diffusion_model
    sampling = model.get_model_object("model_sampling")

    def official_model(apply_model, args):
        x, sigma, c = args["input"], args["timestep"], args["c"]
        xc = sampling.calculate_input(sigma, x)
        eps = reference_steered_unet(unet, xc, sampling.timestep(sigma).float(), c["c_crossattn"], sd, hint)
        return sampling.calculate_denoised(sigma, eps.float(), x)

    def encode(text):
        tokens = clip.tokenize(text)
        return clip.encode_from_tokens_scheduled(tokens)

    steered = model.clone()
    steered.set_model_unet_function_wrapper(official_model)
    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    noise = comfy.sample.prepare_noise(latent, SEED)
    with torch.no_grad():
        samples = comfy.sample.sample(steered, noise, STEPS, CFG, "euler", "normal", encode(POSITIVE),
                                      encode(NEGATIVE), latent, seed=SEED, disable_pbar=True)
    del steered, model, clip, unet, sd
    comfy_host.release_memory()
    return {"samples": samples.float(), "hint": hint}


@pytest.fixture(scope="module")
def style2_adapter(tmp_path_factory):
    """A (scaled) official style2 checkpoint, converted: 24 channels at latent resolution."""
    from bps.convert_official import convert_official
    tmp = tmp_path_factory.mktemp("style2")
    torch.save(lightning_checkpoint(official_state_dict("style2")), tmp / "style2.ckpt")
    convert_official(tmp / "style2.ckpt", tmp / "bps_style2.safetensors")
    return tmp / "bps_style2.safetensors"


@pytest.fixture(scope="module")
def server(reference, official, style2_adapter, sd15_ckpt, tmp_path_factory):
    base = tmp_path_factory.mktemp("server")
    with ComfyServer(base) as s:
        s.add_model("checkpoints", sd15_ckpt, "sd15.safetensors")
        s.add_model("bps", official["adapter"])
        s.add_model("bps", style2_adapter)
        _hint_png(s.input_dir / "sketch.png")
        s.start()
        yield s


def _prompt(adapter: str | None, strength: float = 1.0, prefix: str = "bps") -> dict:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> LoadImage -> BPSLoader -> BPSApply -> KSampler -> SaveLatent
    (no BPS nodes when ``adapter`` is None)."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": POSITIVE}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": NEGATIVE}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "7": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0] if adapter is None else ["5", 0], "seed": SEED, "steps": STEPS,
                         "cfg": CFG, "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
                         "negative": ["3", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
    }
    if adapter is not None:
        prompt.update({
            "4": {"class_type": "LoadImage", "inputs": {"image": "sketch.png"}},
            "9": {"class_type": "BPSLoader", "inputs": {"adapter_name": adapter}},
            "5": {"class_type": "BPSApply",
                  "inputs": {"model": ["1", 0], "bps_adapter": ["9", 0], "image": ["4", 0], "strength": strength,
                             "start_percent": 0.0, "end_percent": 1.0}},
        })
    return prompt


def _saved_latent(server: ComfyServer, prefix: str, timeout: float = 900) -> torch.Tensor:
    """Run ``_prompt``'s result through SaveLatent and read the .latent file it wrote back."""
    from safetensors.torch import load_file
    server.run(PROMPTS[prefix](), timeout=timeout)
    files = sorted(server.output_dir.glob(f"{prefix}_*.latent"))
    assert len(files) == 1, (files, server.log_tail())
    return load_file(str(files[0]))["latent_tensor"].float()


PROMPTS = {
    "steered": lambda: _prompt("bps_sketch.safetensors", prefix="steered"),
    "plain": lambda: _prompt(None, prefix="plain"),
    "zero": lambda: _prompt("bps_sketch.safetensors", 0.0, prefix="zero"),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_the_converted_official_adapter_reproduces_the_official_steered_sampling(server, reference):
    steered = _saved_latent(server, "steered")
    official = reference["samples"]
    assert steered.shape == official.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert torch.isfinite(official).all()
    assert _rel(steered, official) < 1e-4, _rel(steered, official)

    plain = _saved_latent(server, "plain")
    assert _rel(plain, official) > 1e-2, _rel(plain, official)  # the steering is not vacuous
    zero = _saved_latent(server, "zero")
    assert torch.equal(zero, plain)  # strength 0: bit-identical to the unsteered model


def test_an_adapter_no_image_can_feed_fails_its_prompt_and_the_server_keeps_serving(server):
    with pytest.raises(PromptFailed) as failure:
        server.run(_prompt("bps_style2.safetensors", prefix="style2"), timeout=600)
    details = failure.value.details
    assert details["node_type"] == "BPSApply"
    message = details["exception_message"]
    assert "'bps_style2.safetensors'" in message and "24-channel map at latent resolution" in message
    assert server.process.poll() is None and "BPSApply" in server.object_info()
