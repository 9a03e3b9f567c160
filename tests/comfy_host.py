"""The real ComfyUI for integration tests: booted from $COMFYUI_PATH, never faked.

Tests that need it take the ``comfyui_host`` fixture (tests/conftest.py) and are skipped, with the
reason shown, when COMFYUI_PATH is unset. ComfyUI is booted exactly as the trainer boots it
(train/train_bps.py), and the pack is loaded through ComfyUI's own custom-node loader.

The suite runs on ComfyUI 0.8.0 and 0.33.0 (.ci/run). What the tests must do differently between
the two lives here (in-process ComfyUI), in comfy_server.py (its HTTP API) and in comfy_frontend.py
(its frontend); the pack's own differences live in nodes/comfy_compat.py.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SKIP_REASON = ("COMFYUI_PATH is not set: ComfyUI integration tests need a real ComfyUI checkout "
               "(export COMFYUI_PATH=/path/to/ComfyUI, with its requirements installed)")


def trainer_entry():
    """train/train_bps.py, loaded by path (it holds find_comfyui/boot_comfyui/import_pack)."""
    name = "comfyui_bps_train_entry"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "train" / "train_bps.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def comfyui_path() -> Path | None:
    """The ComfyUI checkout named by COMFYUI_PATH, or None."""
    env = os.environ.get("COMFYUI_PATH")
    return Path(env).expanduser().resolve() if env else None


def boot() -> None:
    """Import ComfyUI (CPU mode without CUDA) as its main.py does."""
    trainer_entry().boot_comfyui(comfyui_path())


def load_pack():
    """Load this repo through ComfyUI's own custom-node loader; return the pack module."""
    import nodes as comfy_nodes
    name = str(ROOT).replace(".", "_x_")
    if name not in sys.modules:
        assert asyncio.run(comfy_nodes.load_custom_node(str(ROOT))), "ComfyUI failed to load the pack"
    return sys.modules[name]


def pack_module(pack, dotted: str):
    """Submodule ``dotted`` (e.g. "nodes.steering") of the loaded pack."""
    return importlib.import_module(f"{pack.__name__}.{dotted}")


def prompt_executor(server):
    """ComfyUI's ``execution.PromptExecutor`` reporting to ``server``, with the classic node cache
    (outputs dropped as soon as no node needs them) and the cache arguments ``main.py`` passes.

    0.33 reads ``ram_inactive`` (the RAM headroom kept while idle) unconditionally; 0.8 ignores it.
    """
    import execution
    return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                    cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})


def random_sd15_model(seed: int = 0):
    """A ComfyUI ModelPatcher around an SD1.5 BaseModel with seeded random weights (fp32)."""
    return trainer_pack().train.random_checkpoint.random_sd15_model(torch.float32, seed=seed)


def trainer_pack():
    """This pack as the trainer imports it (under its fixed name), with train.random_checkpoint loaded."""
    pack = trainer_entry().import_pack()
    importlib.import_module(f"{pack.__name__}.train.random_checkpoint")
    return pack


def steering_network(bps, config=None, seed: int = 1):
    """A B_phi (``bps.BPSConfig()`` unless ``config``) whose zero-initialised convs are not zero,
    so it really steers: fan-in scaled normal weights, seeded, in eval mode without gradients."""
    with torch.random.fork_rng():  # the default init of the biases, without touching the global RNG
        torch.manual_seed(seed)
        net = bps.BPSNetwork(config or bps.BPSConfig())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p[0].numel() ** 0.5))
    return net.eval().requires_grad_(False)


def release_memory() -> None:
    """Unload (and so unpatch) every model ComfyUI holds, free what nothing references, and hand
    the freed heap back to the OS.

    Without the last step glibc keeps freed multi-GB tensors in its arenas (its mmap threshold
    grows after large frees), so a test process that has built and dropped full-width adapters
    still looks several GB larger than it is, and the subprocess tests that follow run out of RAM.
    Safe to call before ComfyUI is booted: then only the last two steps run.
    """
    # The nodes' process-wide caches (loaded adapters, B_phi residuals) of every loaded copy of the pack.
    for name, module in list(sys.modules.items()):
        if name.endswith(".nodes.adapter_cache"):
            module.ADAPTERS.clear()
        elif name.endswith(".nodes.model_management") and getattr(module, "_RESIDUAL_CACHE", None) is not None:
            module._RESIDUAL_CACHE.clear()
    management = sys.modules.get("comfy.model_management")
    if management is not None:
        management.unload_all_models()
        gc.collect()
        management.cleanup_models()
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def network_digest(network: torch.nn.Module) -> str:
    """sha256 of a network's parameter names and exact bytes: equal digests, bit-identical weights."""
    h = hashlib.sha256()
    for k, v in network.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()
