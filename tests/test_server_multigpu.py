"""A steered model through core's MultiGPU CFG split, on a real ComfyUI server as a user queues it.

Two API prompts sharing their loaders: the random SD1.5 checkpoint (Load Checkpoint), Load BPS
Adapter, a sketch (Load Image) and Apply BPS; the first samples (KSampler, Save Latent) the model
without BPS and the steered model, the second the steered model through core's MultiGPU CFG Split
(`MultiGPU_WorkUnits`, max_gpus 2), so its server log is the split's alone. ComfyUI 0.33's node
deep-clones the MODEL for every extra device (`comfy/multigpu.py::create_multigpu_deepclones` ->
`ModelPatcher.deepclone_multigpu`): the UNet from the checkpoint loader's factory, and every
additional model, B_phi's patcher among them, from its own factory (the pack's
`cached_patcher_init`, which re-reads the adapter file). KSampler then loads both copies and runs
the positive and the negative CFG rows on different devices, each in its own thread of core's
`MultiGPUThreadPool` (`comfy/samplers.py::_calc_cond_batch_multigpu`), with the main model's
wrappers cast to each device (`.to(device)`: Apply BPS's wrapper hands over the one that computes
with that device's B_phi copy).

A CPU machine has one device: core's `comfy.model_management.get_all_torch_devices` lists only
`cpu`, so the node clones nothing. The server of this test gets a second device: a small test-only
module in the custom_nodes folder of the test's server (written by this test, not part of the
pack) wraps `get_all_torch_devices` to add `torch.device("cpu", 0)`, which compares unequal to
`torch.device("cpu")` (so core treats it as another device) while tensors moved to it stay in CPU
memory. That widens only the hardware list; everything else (the node, the deep clone, the
loaders' factories, model loading, the split of the CFG rows across devices and threads) is core's
own code.

Two devices computing one row each must give what one device computes for both rows at once, to
batched-kernel rounding (measured 2e-6 of the latent's largest value). The negative row's
residuals come from the clone's own B_phi, so a copy with other weights moves the result far
beyond that (halving the rebuilt copy's weights moved it by 1.2), as does a lost steering.

ComfyUI 0.8.0 has no MultiGPU (no node, no `comfy/multigpu.py`, no deep clone, no device list):
there the test checks that core lacks every piece of it and that the pack's compat flag agrees, and
starts no server (`_core_has_multigpu`, the one place where the hosts differ).
"""

from __future__ import annotations

import re
from importlib import import_module

import numpy as np
import pytest
import torch

from comfy_server import ComfyServer, add_euler_sampler

SIZE, STEPS, CFG, SEED = 64, 2, 3.0, 5
#: The test-only module that adds the second CPU device (see the module docstring).
SECOND_DEVICE_MODULE = "bps_test_second_cpu_device.py"
SECOND_DEVICE_SOURCE = '''"""Test-only (ComfyUI-BPS tests/test_server_multigpu.py): a second CPU device in ComfyUI's
hardware list, so core's MultiGPU nodes find two devices on a CPU machine. Nothing else changes."""
import logging

import torch

import comfy.model_management

_core_devices = comfy.model_management.get_all_torch_devices
SECOND_CPU = torch.device("cpu", 0)


def get_all_torch_devices(exclude_current=False):
    devices = list(_core_devices(exclude_current=exclude_current))
    if all(d.type == "cpu" for d in devices) and SECOND_CPU not in devices:
        devices.append(SECOND_CPU)
    return devices


comfy.model_management.get_all_torch_devices = get_all_torch_devices
logging.info("BPS test: hardware list widened to %s", get_all_torch_devices())
NODE_CLASS_MAPPINGS = {}
'''
WIDENED = "BPS test: hardware list widened to [device(type='cpu'), device(type='cpu', index=0)]"
#: Core's log line for every model it deep-clones for the second device (model_patcher.py).
DEEPCLONE = re.compile(r"Creating deepclone of (\w+) for cpu:0\.")
#: Core's log line for every model a sampler loads (model_management.load_models_gpu).
LOAD = re.compile(r"Requested to load (\w+)")
#: One CFG row per device vs both rows in one batch: CPU kernels round differently. Measured 2e-6
#: of the latent's largest value (ComfyUI 0.33.0, 2 cores); the bound leaves 50x room.
ROUNDING = 1e-4
#: How far the steering moves the latent at least, as a fraction of its largest value.
STEER_EFFECT = 0.1


def _sketch() -> np.ndarray:
    """A grey sketch: a circle and a square outline on light texture."""
    from PIL import Image, ImageDraw
    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 8, 32, 32), outline=255, width=2)
    draw.rectangle((36, 30, 58, 56), outline=255, width=2)
    texture = (np.random.default_rng(0).random((SIZE, SIZE)) * 40).astype(np.uint8)
    return np.maximum(np.asarray(image), texture)


@pytest.fixture(scope="module")
def server(pack, sd15_ckpt, tmp_path_factory):
    """A server with the random SD1.5 checkpoint, a full-width steering adapter, a sketch, and the
    test-only second CPU device. It peaks at about 14 GB of RAM (measured 13.7 GB): the split holds
    two fp32 UNets and two fp32 B_phi, one of each per device."""
    from PIL import Image

    import comfy_host
    base = tmp_path_factory.mktemp("server_multigpu")
    adapter = tmp_path_factory.mktemp("adapter") / "bps_sketch.safetensors"
    pack.bps.save_adapter(adapter, comfy_host.steering_network(pack.bps, seed=1), dtype=torch.float16)
    comfy_host.release_memory()  # the 2.6 GB network built for the file, back to the OS before the server needs RAM
    with ComfyServer(base) as s:
        (s.base / "custom_nodes" / SECOND_DEVICE_MODULE).write_text(SECOND_DEVICE_SOURCE)
        s.add_model("checkpoints", sd15_ckpt, "sd15.safetensors")
        s.add_model("bps", adapter)
        Image.fromarray(_sketch()).convert("RGB").save(s.input_dir / "sketch.png")
        s.start()
        yield s
    adapter.unlink()  # 1.3 GB: not kept for the rest of the session


def _loaders() -> dict:
    """The nodes both prompts share (ComfyUI runs them once and serves the second prompt from its cache)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a line drawing"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "BPSLoader", "inputs": {"adapter_name": "bps_sketch.safetensors"}},
        "6": {"class_type": "LoadImage", "inputs": {"image": "sketch.png"}},
        "7": {"class_type": "BPSApply", "inputs": {"model": ["1", 0], "bps_adapter": ["5", 0], "image": ["6", 0],
                                                   "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
    }


def _prompt(samplers: dict[str, list]) -> dict:
    """The shared loaders and a KSampler + Save Latent per entry of ``samplers`` (name: model),
    each saving its latent under its name."""
    prompt = _loaders()
    for name, model in samplers.items():
        add_euler_sampler(prompt, name, model, ["4", 0], seed=SEED, steps=STEPS, cfg=CFG)
    return prompt


def _run(server: ComfyServer, prompt: dict) -> str:
    """Run ``prompt`` (PromptFailed with the node's error if it fails); the server's log lines it wrote."""
    start = server.log_path.stat().st_size
    server.run(prompt, timeout=600)
    with open(server.log_path, "rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace")


def _latent(server: ComfyServer, name: str) -> torch.Tensor:
    from safetensors.torch import load_file
    files = sorted(server.output_dir.glob(f"{name}_[0-9]*_.latent"))
    assert len(files) == 1, (name, files, server.log_tail())
    latent = load_file(str(files[0]))["latent_tensor"].float()
    assert latent.shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(latent).all(), name
    return latent


def _gap(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return float((a - b).abs().max()) / scale


def _core_has_multigpu(pack) -> bool:
    """Whether this ComfyUI has MultiGPU (0.33: yes; 0.8.0: no), after checking that core's pieces
    of it and the pack's compat flag all agree: the one place where the two hosts differ here."""
    import importlib.util

    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension

    import comfy_host
    compat = import_module(f"{pack.__name__}.nodes.comfy_compat")
    facts = {
        "comfy_extras/nodes_multigpu.py": (comfy_host.comfyui_path() / "comfy_extras" / "nodes_multigpu.py").is_file(),
        "comfy.multigpu": importlib.util.find_spec("comfy.multigpu") is not None,
        "ModelPatcher.deepclone_multigpu": hasattr(comfy.model_patcher.ModelPatcher, "deepclone_multigpu"),
        "CallbacksMP.ON_DEEPCLONE_MULTIGPU": hasattr(comfy.patcher_extension.CallbacksMP, "ON_DEEPCLONE_MULTIGPU"),
        "model_management.get_all_torch_devices": hasattr(comfy.model_management, "get_all_torch_devices"),
        "the pack's PATCHERS_HAVE_FACTORIES": compat.PATCHERS_HAVE_FACTORIES,
    }
    assert len(set(facts.values())) == 1, f"ComfyUI has only part of MultiGPU, or the pack disagrees: {facts}"
    return facts["comfy.multigpu"]


def test_a_steered_model_goes_through_core_multigpu_cfg_split(request, pack):
    if not _core_has_multigpu(pack):
        return  # 0.8.0: no MultiGPU node, deep clone or device list; the pack registers nothing for it
    server = request.getfixturevalue("server")  # started only where there is MultiGPU to test
    assert WIDENED in server.log_path.read_text(errors="replace"), \
        f"the test's second CPU device was not installed; log:\n{server.log_tail()}"
    info = server.object_info()
    assert info["MultiGPU_WorkUnits"]["display_name"] == "MultiGPU CFG Split", info.get("MultiGPU_WorkUnits")

    # First the two references: the model without BPS and the steered model, on one device.
    _run(server, _prompt({"plain": ["1", 0], "steered": ["7", 0]}))
    # Then the same steered model through the CFG split (its loaders come from the server's cache),
    # so this prompt's log is the split's alone.
    split_prompt = _prompt({"split": ["8", 0]})
    split_prompt["8"] = {"class_type": "MultiGPU_WorkUnits", "inputs": {"model": ["7", 0], "max_gpus": 2}}
    log = _run(server, split_prompt)
    assert "Traceback" not in log, log[-4000:]
    # Core deep-cloned the UNet (from the checkpoint loader's factory) and then B_phi (its
    # additional model, from the pack's factory) for the second device, once each.
    assert DEEPCLONE.findall(log) == ["BaseModel", "BPSNetwork"], f"deep clones for cpu:0; log:\n{log[-4000:]}"
    # KSampler loaded the original and the clone of each (the deep clone unloaded the original
    # first): two UNets and two B_phi for the two devices the CFG rows are split across.
    loaded = LOAD.findall(log)
    assert sorted(loaded) == ["BPSNetwork", "BPSNetwork", "BaseModel", "BaseModel"], (loaded, log[-4000:])

    plain, steered, split = (_latent(server, name) for name in ("plain", "steered", "split"))
    scale = float(steered.abs().max())
    split_gap, steer_gap = _gap(split, steered, scale), _gap(steered, plain, scale)
    assert split_gap < ROUNDING, f"the CFG split moved the steered latent by {split_gap:.3g} of its largest value"
    assert steer_gap > STEER_EFFECT, f"the steering moved the latent by only {steer_gap:.3g} of its largest value"
