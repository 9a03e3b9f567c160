"""Context windows with a hint per frame, through a real ComfyUI server as a user queues them.

One API prompt: three latent frames (64x64 pixels, 2 euler steps), three different sketches loaded
with Load Image and batched with core's Batch Images, Load BPS Adapter + Apply BPS, core's
Context Windows (Manual) node (`ContextWindowsManual`, on the batch dimension as SD1.5 animation
uses it), KSampler and SaveLatent; four samplers share the loaders: unsteered, steered without
windows, steered in windows, and steered in windows with the sketches batched in another order.
The frames share one noise (core's LatentBatchSeedBehavior "fixed"), so a frame's result depends
only on the hint it was steered with.

The windows (length 2, overlap 1: frames 0-1 and 1-2, pyramid fuse, and on 0.33 its causal
anchor frame 0 in front of the second window) compute frame 1 twice and average the two.
SD1.5's image UNet treats the frames of a batch independently, so every window computes a frame
the same way, and windowed frames must equal unwindowed ones to batched-kernel rounding, however
the overlap is fused. A frame steered with another frame's hint, in any window, moves it far
beyond that rounding: the distinct frames and the permuted batch check that.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from comfy_server import ComfyServer, add_euler_sampler

SIZE, STEPS, CFG, SEED, FRAMES = 64, 2, 3.0, 7, 3
WINDOW, OVERLAP = 2, 1
#: Core's log line when a sampling step runs in windows (0.8.0: "Using context windows 2 with
#: overlap 1 for 3 frames."; 0.33: "Using context windows: Context length 2 with overlap 1 ...").
WINDOWS_USED = re.compile(rf"Using context windows\D*{WINDOW} with overlap {OVERLAP} for {FRAMES} frames")
#: Frames computed in one batch of 6 rows (3 frames x cond/uncond) or in windows of 4 and 6 rows
#: go through CPU kernels that round differently: measured up to 2e-6 of the frames' largest value
#: on ComfyUI 0.33.0; the bound leaves 50x room.
ROUNDING = 1e-4
#: How far frames steered by different sketches are apart at least, as a fraction of the frames'
#: largest value (measured 0.4 to 0.6; a hint taken from the wrong frame moves a frame that far).
HINT_EFFECT = 0.1
IDENTITY, PERMUTED = [0, 1, 2], [2, 0, 1]


def _sketch(index: int) -> np.ndarray:
    """A different grey sketch per frame: a shape outline at its own place, on light texture."""
    from PIL import Image, ImageDraw
    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    x, y = 16 + 14 * index, 44 - 12 * index
    if index % 2 == 0:
        draw.ellipse((x - 10, y - 10, x + 10, y + 10), outline=255, width=2)
    else:
        draw.rectangle((x - 9, y - 9, x + 9, y + 9), outline=255, width=2)
    texture = (np.random.default_rng(index).random((SIZE, SIZE)) * 40).astype(np.uint8)
    return np.maximum(np.asarray(image), texture)


@pytest.fixture(scope="module")
def server(pack, sd15_ckpt, tmp_path_factory):
    """A server with the random SD1.5 checkpoint, a full-width steering adapter and three sketches."""
    from PIL import Image

    import comfy_host
    base = tmp_path_factory.mktemp("server_context_windows")
    adapter = tmp_path_factory.mktemp("adapter") / "bps_sketch.safetensors"
    pack.bps.save_adapter(adapter, comfy_host.steering_network(pack.bps, seed=1), dtype=torch.float16)
    with ComfyServer(base) as s:
        s.add_model("checkpoints", sd15_ckpt, "sd15.safetensors")
        s.add_model("bps", adapter)
        for i in range(FRAMES):
            Image.fromarray(_sketch(i)).convert("RGB").save(s.input_dir / f"frame{i}.png")
        s.start()
        yield s
    adapter.unlink()  # 1.3 GB: not kept for the rest of the session


def _windows_inputs(server: ComfyServer) -> dict:
    """ContextWindowsManual's inputs as its schema on this server asks for them: ours where we
    choose, the node's own defaults for the inputs one version has and the other does not (0.33's
    `causal_window_fix` stays on, its default: later windows get the frame before them in front)."""
    info = server.object_info("ContextWindowsManual")  # KeyError here: core lost the node
    chosen = {"context_length": WINDOW, "context_overlap": OVERLAP, "context_schedule": "standard_static",
              "context_stride": 1, "closed_loop": False, "fuse_method": "pyramid", "dim": 0, "freenoise": False}
    inputs = {}
    for name, spec in info["input"]["required"].items():
        if name == "model":
            continue
        if name in chosen:
            inputs[name] = chosen[name]
        else:
            assert len(spec) > 1 and "default" in spec[1], f"ContextWindowsManual input {name} has no default"
            inputs[name] = spec[1]["default"]
    assert set(chosen) <= set(inputs), (chosen, inputs)
    assert inputs.get("causal_window_fix", True) is True  # 0.33: the anchor frame path is exercised
    return inputs


def _prompt(server: ComfyServer) -> dict:
    """One prompt, four samplers sharing the loaders (one checkpoint load, one adapter load), each
    saving its latent frames under its own prefix:

    - ``plain``: the model without BPS;
    - ``whole``: Apply BPS with the sketches in order (frame f steered by sketch f), no windows;
    - ``windowed``: the same steered model in context windows;
    - ``windowed_permuted``: the sketches batched in the order PERMUTED, in context windows.
    """
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a line drawing, frame"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": FRAMES}},
        "5": {"class_type": "LatentBatchSeedBehavior", "inputs": {"samples": ["4", 0], "seed_behavior": "fixed"}},
        "6": {"class_type": "BPSLoader", "inputs": {"adapter_name": "bps_sketch.safetensors"}},
    }
    for i in range(FRAMES):
        prompt[f"load{i}"] = {"class_type": "LoadImage", "inputs": {"image": f"frame{i}.png"}}
    windows = _windows_inputs(server)

    def steered(name: str, order: list[int]) -> list:
        batch = [f"load{order[0]}", 0]
        for f in range(1, FRAMES):  # Batch Images appends: the batch holds the sketches in `order`
            prompt[f"{name}_batch{f}"] = {"class_type": "ImageBatch",
                                          "inputs": {"image1": batch, "image2": [f"load{order[f]}", 0]}}
            batch = [f"{name}_batch{f}", 0]
        prompt[f"{name}_apply"] = {"class_type": "BPSApply",
                                   "inputs": {"model": ["1", 0], "bps_adapter": ["6", 0], "image": batch,
                                              "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        return [f"{name}_apply", 0]

    def windowed(name: str, model: list) -> list:
        prompt[f"{name}_windows"] = {"class_type": "ContextWindowsManual", "inputs": {"model": model, **windows}}
        return [f"{name}_windows", 0]

    in_order = steered("in_order", IDENTITY)
    models = {"plain": ["1", 0], "whole": in_order, "windowed": windowed("windowed", in_order),
              "windowed_permuted": windowed("windowed_permuted", steered("permuted", PERMUTED))}
    for name, model in models.items():
        add_euler_sampler(prompt, name, model, ["5", 0], seed=SEED, steps=STEPS, cfg=CFG)
    return prompt


@pytest.fixture(scope="module")
def frames(server) -> dict[str, torch.Tensor]:
    """Run the prompt; the latent frames each sampler saved, by name."""
    from safetensors.torch import load_file
    log_start = server.log_path.stat().st_size
    server.run(_prompt(server), timeout=600)
    with open(server.log_path, "rb") as log:
        log.seek(log_start)
        used = len(WINDOWS_USED.findall(log.read().decode(errors="replace")))
    # Core logs the line on every sampling step it runs in windows: the two windowed samplers' steps.
    assert used == 2 * STEPS, f"context windows used on {used} steps, not {2 * STEPS}; log:\n{server.log_tail()}"
    out = {}
    for name in ("plain", "whole", "windowed", "windowed_permuted"):
        files = sorted(server.output_dir.glob(f"{name}_[0-9]*_.latent"))
        assert len(files) == 1, (name, files, server.log_tail())
        out[name] = load_file(str(files[0]))["latent_tensor"].float()
        assert out[name].shape == (FRAMES, 4, SIZE // 8, SIZE // 8) and torch.isfinite(out[name]).all()
    return out


def _gap(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return float((a - b).abs().max()) / scale


def test_the_context_windows_node_is_registered_by_the_server(server):
    info = server.object_info()
    assert "ContextWindowsManual" in info, "core's Context Windows (Manual) node is not registered"
    assert info["ContextWindowsManual"]["output"] == ["MODEL"]


def test_the_hints_matter_and_each_frame_has_its_own(frames):
    plain, whole = frames["plain"], frames["whole"]
    scale = float(whole.abs().max())
    # The frames share one noise: unsteered, they are one frame three times.
    for f in range(1, FRAMES):
        assert torch.equal(plain[f], plain[0]), f
    # Each steered frame is far from the unsteered one, and from every other steered frame.
    for f in range(FRAMES):
        assert _gap(whole[f], plain[f], scale) > HINT_EFFECT, (f, _gap(whole[f], plain[f], scale))
        for g in range(f):
            assert _gap(whole[f], whole[g], scale) > HINT_EFFECT, (f, g, _gap(whole[f], whole[g], scale))


def test_in_context_windows_every_frame_comes_out_as_without_them(frames):
    whole, windowed = frames["whole"], frames["windowed"]
    scale = float(whole.abs().max())
    gaps = [_gap(windowed[f], whole[f], scale) for f in range(FRAMES)]
    assert max(gaps) < ROUNDING, gaps


def test_permuting_the_hints_permutes_the_windowed_frames(frames):
    """Frame f of the permuted batch follows sketch PERMUTED[f], in context windows too."""
    whole, permuted = frames["whole"], frames["windowed_permuted"]
    scale = float(whole.abs().max())
    gaps = [_gap(permuted[f], whole[PERMUTED[f]], scale) for f in range(FRAMES)]
    assert max(gaps) < ROUNDING, gaps
