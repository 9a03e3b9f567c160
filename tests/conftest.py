"""Shared fixtures. ComfyUI fixtures skip, with the reason shown, when COMFYUI_PATH is unset."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

import comfy_host
import official_checkpoints

# CI's skip policy: with BPS_REQUIRE_ALL_TESTS set, any skipped test fails the session.
from skip_policy import pytest_sessionfinish  # noqa: E402,F401  (a hook: pytest finds it by name)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny tensors on one thread: a thread pool costs more in synchronisation than
    it saves (badly so on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def _memory_back_after_each_module():
    """Give each module's models back before the next module runs.

    Autouse fixtures are set up first, so this one is torn down last, after the module's own
    fixtures (sd15, full_adapter, loaded checkpoints) have been dropped.
    """
    yield
    comfy_host.release_memory()


@pytest.fixture(scope="session")
def official_keys():
    """The official BPS-v1-1 key list, as tests/official_checkpoints.py; skips, with the reason
    shown, when the file is missing (CI turns that skip into a failure)."""
    reason = official_checkpoints.missing_reason()
    if reason:
        pytest.skip(reason)
    official_checkpoints.key_list()  # fails here, not in every test, if the file is not the expected one
    return official_checkpoints


@pytest.fixture(scope="session")
def comfyui_host():
    """The real ComfyUI, booted once per session."""
    if comfy_host.comfyui_path() is None:
        pytest.skip(comfy_host.SKIP_REASON)
    comfy_host.boot()
    return comfy_host


@pytest.fixture(scope="session")
def pack(comfyui_host):
    """This pack, loaded through ComfyUI's custom-node loader."""
    return comfy_host.load_pack()


@pytest.fixture(scope="session")
def steering(pack, comfyui_host):
    return comfy_host.pack_module(pack, "nodes.steering")


@pytest.fixture(scope="module")
def sd15(comfyui_host):
    """Random-weight SD1.5 ModelPatcher built from ComfyUI's classes (shared: never mutate it).

    Module-scoped, like ``full_adapter``: together they hold ~6 GB, which the trainer tests (and
    their subprocesses) need back on a 24 GB machine.
    """
    return comfy_host.random_sd15_model(seed=0)


@pytest.fixture(scope="module")
def full_adapter(pack):
    """A full-width SD1.5 adapter whose output convs are non-zero, so it really steers."""
    bps = pack.bps
    net = comfy_host.steering_network(bps, seed=1)
    return bps.Adapter(net, list(bps.PAPER_OMEGA), net.config, {}, None, "sketch")


@pytest.fixture(scope="session")
def sd15_ckpt(comfyui_host, tmp_path_factory) -> Path:
    """A random-weight SD1.5 checkpoint file that ComfyUI's checkpoint loader detects (~2 GB, fp16).

    Set BPS_TEST_SD15_CKPT to keep it between runs: an existing file there is used as it is, a
    missing one is written there (CI writes it once for both ComfyUI versions).
    """
    reuse = os.environ.get("BPS_TEST_SD15_CKPT")
    if reuse and Path(reuse).is_file():
        return Path(reuse)
    path = Path(reuse) if reuse else tmp_path_factory.mktemp("sd15") / "sd15_random.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy_host.trainer_pack().train.random_checkpoint.write_random_sd15_checkpoint(path, seed=0)
    gc.collect()
    return path


@pytest.fixture(scope="session")
def sdxl_reduced_ckpts(comfyui_host, tmp_path_factory) -> dict[str, Path]:
    """Reduced-width SDXL checkpoint files from ComfyUI's SDXL classes (tests/sdxl_models.py),
    ``{"eps": path, "v": path}``, ~1.8 GB each in fp16. Set BPS_TEST_SDXL_DIR to a folder to keep
    and reuse them."""
    import sdxl_models
    folder = os.environ.get("BPS_TEST_SDXL_DIR") or tmp_path_factory.mktemp("sdxl")
    paths = sdxl_models.write_reduced_sdxl_checkpoints(comfy_host.trainer_pack().train.random_checkpoint,
                                                       Path(folder))
    gc.collect()
    return paths
