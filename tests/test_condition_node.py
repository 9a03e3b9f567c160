"""BPS Condition from Image in the real ComfyUI, and training from images alone end to end.

The trainer's command line trains on a folder holding only target images and captions with
``--condition sketch``; the adapter names its preprocessor, and the node, given that adapter and
the same image (through ComfyUI's own LoadImage), returns bit for bit the condition the trainer
cached. The trainer run uses the random-weight SD1.5 checkpoint (``sd15_ckpt``) at 64x64 pixels.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import cv2
import pytest
import torch

import comfy_host

ROOT = Path(__file__).resolve().parents[1]


def _node(node_id):
    import nodes as comfy_nodes
    return comfy_nodes.NODE_CLASS_MAPPINGS[node_id]


@pytest.fixture(scope="module")
def cmaps(pack):
    return comfy_host.pack_module(pack, "bps.condition_maps")


def _adapter(pack, hint_channels=1, extra_channels=0, meaning="sketch", condition=None):
    """An adapter as the nodes see it; its network on the meta device (the node reads only the
    config and metadata, and a full-width B_phi would cost 2.7 GB)."""
    bps = pack.bps
    config = bps.BPSConfig(hint_channels=hint_channels, extra_channels=extra_channels)
    with torch.device("meta"):
        network = bps.BPSNetwork(config)
    metadata = {"condition": condition} if condition else {}
    return bps.Adapter(network, list(bps.PAPER_OMEGA)[:config.num_ports], config, metadata, None, meaning)


def _photo(size=(96, 80)) -> torch.Tensor:
    img = cv2.cvtColor(cv2.imread(str(ROOT / "example_inputs" / "bps_example_photo.png")), cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return torch.from_numpy(img).float().div(255.0)[None]


def _run(image, preprocessor="auto", parameters="", adapter=None) -> torch.Tensor:
    return _node("BPSConditionFromImage").execute(image, preprocessor, parameters, adapter).args[0]


# --------------------------------------------------------------------------------- the node

def test_each_preprocessor_runs_per_image_and_returns_a_previewable_image(pack, cmaps):
    photo = _photo()
    batch = torch.cat([photo, photo.flip(2)])
    for kind in cmaps.KINDS:
        out = _run(batch, kind)
        assert out.shape == (2, 80, 96, 3) and out.dtype == torch.float32
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        for i in range(2):
            want = torch.from_numpy(cmaps.condition_map(batch[i].numpy(), cmaps.ConditionSpec.make(kind)))
            assert torch.equal(out[i], want.expand(-1, -1, 3)), kind
    assert not torch.equal(_run(photo, "sketch"), _run(photo, "sketch", "sigma=3 threshold=0.02"))
    result = _node("BPSConditionFromImage").execute(photo, "edges", "", None)
    assert result.ui is not None and result.ui.as_dict()["images"], "the condition is previewed on the node"


def test_search_finds_the_node_by_what_people_call_it_where_the_api_has_them(pack):
    info = _node("BPSConditionFromImage").GET_NODE_INFO_V1()
    has_aliases = comfy_host.pack_module(pack, "nodes.comfy_compat").SCHEMA_HAS_SEARCH_ALIASES
    assert ("canny" in info.get("search_aliases", [])) == has_aliases
    assert info["category"] == "conditioning/bps" and info["display_name"] == "BPS Condition from Image"


def test_auto_takes_the_adapters_stored_preprocessor_then_its_meaning(pack, cmaps):
    photo = _photo()
    spec = cmaps.ConditionSpec.make("edges", {"low": 20, "high": 60})
    trained = _adapter(pack, condition=spec.to_dict())
    want = torch.from_numpy(cmaps.condition_map(photo[0].numpy(), spec))
    assert torch.equal(_run(photo, "auto", "", trained)[0], want.expand(-1, -1, 3))
    # parameters still change single values of the stored ones
    tuned = cmaps.ConditionSpec.make("edges", {"low": 20, "high": 90})
    assert torch.equal(_run(photo, "auto", "high=90", trained)[0],
                       torch.from_numpy(cmaps.condition_map(photo[0].numpy(), tuned)).expand(-1, -1, 3))
    # adapters that store none (converted official ones, adapters trained on pairs): by meaning, else channels
    for channels, meaning, kind in [(1, "sketch", "sketch"), (3, "layout", "layout"), (3, "segmentation", "rgb"),
                                    (1, "depth", "gray")]:
        got = _run(photo, "auto", "", _adapter(pack, channels, meaning=meaning))
        assert torch.equal(got, _run(photo, kind)), (meaning, kind)


def test_apply_bps_reads_grey_rgb_as_its_exact_grey_and_colour_by_luminance(pack):
    hint_fit = comfy_host.pack_module(pack, "nodes.hint_fit")
    levels = torch.arange(256, dtype=torch.uint8).float().div(255.0).view(1, 1, 16, 16)
    grey = hint_fit.prepare_hint_channels(levels.expand(1, 3, 16, 16), 1, 0)
    assert torch.equal(grey, levels)  # every 8-bit level exactly (a weighted sum misses 65 by 1 ulp)
    colour = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    luma = (colour * torch.tensor(hint_fit.LUMA).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    assert torch.equal(hint_fit.prepare_hint_channels(colour, 1, 0), luma)


def test_bad_choices_are_refused_with_the_fix(pack):
    photo = _photo()
    ConditionError = pack.bps.errors.ConditionError
    with pytest.raises(ConditionError, match="connect bps_adapter, or choose one of sketch"):
        _run(photo, "auto")
    with pytest.raises(ConditionError, match="layout makes 3-channel conditions but the BPS adapter takes 1"):
        _run(photo, "layout", "", _adapter(pack, 1))
    with pytest.raises(ConditionError, match="style adapter.*BPS Hint Preprocessor"):
        _run(photo, "auto", "", _adapter(pack, 3, 1, meaning="style"))
    with pytest.raises(ConditionError, match="sketch has no parameter 'size'"):
        _run(photo, "sketch", "size=3")
    with pytest.raises(ConditionError, match="cannot run"):
        _run(photo, "auto", "", _adapter(pack, condition={"kind": "pidinet", "params": {}, "version": 1}))
    with pytest.raises(ConditionError, match="garbled preprocessor"):
        _run(photo, "auto", "", _adapter(pack, condition="sketch, I think"))


# ---------------------------------------------------------------- training from images alone

def _target_folder(folder: Path) -> Path:
    """One 64x64 photo (the training size: the cache holds its condition at the image's own size)
    and its caption, no source/; a second image with a broken copy is left to the bad-data test."""
    (folder / "target").mkdir(parents=True)
    img = cv2.imread(str(ROOT / "example_inputs" / "bps_example_photo.png"))
    cv2.imwrite(str(folder / "target" / "cabin.png"), cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA))
    (folder / "target" / "cabin.txt").write_text("a cabin by a lake, photo")
    return folder


def test_bad_images_are_reported_by_name_before_any_model_loads(comfyui_host, tmp_path):
    """The checkpoint does not exist: had the trainer loaded it first, the error would be about it."""
    entry = comfy_host.trainer_entry()
    trainer_pack = entry.import_pack()
    loop = importlib.import_module(f"{trainer_pack.__name__}.train.loop")
    cli = importlib.import_module(f"{trainer_pack.__name__}.train.cli")
    dataset = importlib.import_module(f"{trainer_pack.__name__}.train.dataset")
    data = _target_folder(tmp_path / "data")
    (data / "target" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (data / "target" / "broken.txt").write_text("a broken file")
    argv = ["--ckpt", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "a.safetensors"), "--data",
            str(data), "--condition", "sketch"]
    with pytest.raises(dataset.DataError, match="target/broken.jpg: target image broken.jpg is unreadable"):
        loop.run(cli.parse_args(argv))
    with pytest.raises(loop.TrainError, match="--condition-param: sketch has no parameter 'blur'"):
        loop.run(cli.parse_args(argv + ["--condition-param", "blur=2"]))


@pytest.fixture(scope="module")
def trained(comfyui_host, sd15_ckpt, tmp_path_factory):
    """`python train/train_bps.py --condition sketch` on a folder of one image and its caption."""
    tmp = tmp_path_factory.mktemp("from_images")
    data = _target_folder(tmp / "data")
    out = tmp / "models" / "photo_sketch.safetensors"
    out.parent.mkdir()
    cmd = [sys.executable, str(ROOT / "train" / "train_bps.py"), "--ckpt", str(sd15_ckpt), "--data", str(data),
           "--out", str(out), "--condition", "sketch", "--condition-param", "softness=0.03",
           "--steps", "1", "--batch-size", "1", "--grad-accum", "1", "--omega", "E", "--save-every", "0",
           "--weights-dtype", "bf16", "--optimizer", "adafactor",  # a small training state: 2 GB less
           "--resolution", "64", "--num-workers", "1", "--no-progress", "--cache-dir", str(tmp / "cache")]
    env = {**os.environ, "COMFYUI_PATH": os.environ["COMFYUI_PATH"], "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    return types.SimpleNamespace(proc=proc, out=out, data=data, cache=tmp / "cache")


def test_a_folder_of_images_trains_an_adapter_that_names_its_preprocessor(pack, cmaps, trained):
    proc = trained.proc
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "conditions made from the target images: sketch(sigma=1.4, threshold=0.005, softness=0.03)" in proc.stderr
    adapter = pack.bps.load_adapter(trained.out)
    spec = cmaps.ConditionSpec.make("sketch", {"softness": 0.03})
    assert adapter.condition == spec.to_dict() and adapter.metadata["condition"]["kind"] == "sketch"
    assert adapter.hint_meaning == "sketch" and adapter.config.hint_channels == 1
    assert adapter.metadata["provenance"]["condition"] == spec.describe()
    raw = json.loads(pack.bps.adapter_file._read_header(str(trained.out))[1]["condition"])
    assert raw == {"kind": "sketch", "params": {"sigma": 1.4, "threshold": 0.005, "softness": 0.03},
                   "version": cmaps.ALGORITHM_VERSION}


def test_the_node_given_the_adapter_makes_bit_for_bit_the_condition_the_trainer_cached(pack, trained):
    assert trained.proc.returncode == 0, trained.proc.stderr[-6000:]
    import folder_paths
    from safetensors.torch import load_file
    samples = sorted((trained.cache / "samples").glob("*.safetensors"))
    assert len(samples) == 1
    cached = load_file(str(samples[0]))["hint"]
    assert cached.dtype == torch.uint8 and cached.shape == (1, 64, 64) and int(cached.max()) > 128
    trainer_cache = importlib.import_module(f"{comfy_host.trainer_entry().import_pack().__name__}.train.cache")
    fed_to_b_phi = trainer_cache.hint_values(cached)            # what the training loop gives B_phi

    # The image as a user loads it (ComfyUI's LoadImage), the adapter through Load BPS Adapter.
    old_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(trained.data / "target"))
    try:
        image = _node("LoadImage")().load_image("cabin.png")[0]
    finally:
        folder_paths.set_input_directory(old_input)
    folder_paths.add_model_folder_path("bps", str(trained.out.parent))
    adapter = _node("BPSLoader").execute(adapter_name=trained.out.name).args[0]
    out = _run(image, "auto", "", adapter)
    assert out.shape == (1, 64, 64, 3)
    for channel in range(3):
        assert torch.equal(out[0, :, :, channel], fed_to_b_phi[0]), channel
    # Apply BPS reads the grey RGB back as the one channel B_phi was trained on, bit for bit
    hint_fit = comfy_host.pack_module(pack, "nodes.hint_fit")
    assert torch.equal(hint_fit.prepare_hint_channels(out.movedim(-1, 1), 1, 0)[0], fed_to_b_phi)
    # and the default sketch, not the adapter's softness=0.03, would differ: auto really used the stored one
    assert not torch.equal(_run(image, "sketch")[0, :, :, 0], fed_to_b_phi[0])
