"""Reduced-width SDXL models for tests, built from ComfyUI's own SDXL classes.

A full SDXL UNet has 2.6B parameters; the tests that check wiring (ports, injection, conditioning,
the trainer) need its *layout*, not its width. ``REDUCED_SDXL`` keeps everything that decides the
layout and the conditioning (three levels ``[1, 2, 4]``, 2 ResBlocks per level, no transformer at
level 0, transformers at levels 1-2 and in the middle, 2048-wide text context, 2816-wide ``y``)
and shrinks widths and transformer depths (64 channels, depth 1).

ComfyUI detects a checkpoint's family from its UNet's shape, and its SDXL entry matches only the
full width. :func:`registered_reduced_sdxl` therefore adds, for the duration of a test, one entry
to ComfyUI's own detection list (``comfy.supported_models.models``): a subclass of ComfyUI's SDXL
model config that differs only in the widths it matches. Everything else (``model_base.SDXL`` with
its ``encode_adm``, the SDXL latent format, CLIP-L + CLIP-G, the loader itself) is ComfyUI's.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

#: Reduced SDXL layout (see the module docstring); keys as ComfyUI's unet_config.
REDUCED_SDXL_CHANGES = {
    "model_channels": 64, "transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
}


def reduced_sdxl_config(random_checkpoint) -> dict:
    """The reduced SDXL unet_config (``random_checkpoint``: the pack's train.random_checkpoint)."""
    return random_checkpoint.sdxl_unet_config(**REDUCED_SDXL_CHANGES)


def reduced_sdxl_model_config() -> type:
    """ComfyUI's SDXL model config, matching the reduced widths instead of SDXL's."""
    import comfy.supported_models

    class ReducedSDXL(comfy.supported_models.SDXL):
        unet_config = {
            "model_channels": REDUCED_SDXL_CHANGES["model_channels"], "use_linear_in_transformer": True,
            "transformer_depth": REDUCED_SDXL_CHANGES["transformer_depth"], "context_dim": 2048,
            "adm_in_channels": 2816, "use_temporal_attention": False,
        }

    return ReducedSDXL


@contextlib.contextmanager
def registered_reduced_sdxl() -> Iterator[type]:
    """Let ComfyUI's checkpoint loader detect the reduced SDXL layout while the context is open."""
    import comfy.supported_models

    config = reduced_sdxl_model_config()
    models = comfy.supported_models.models
    models.insert(0, config)
    try:
        yield config
    finally:
        models.remove(config)


#: A custom node for a test server (tests/comfy_server.py): it registers the reduced SDXL with the
#: server's model detection for the server's life, so its checkpoint loader loads the reduced file.
SERVER_CUSTOM_NODE = """
import sys
sys.path.insert(0, {tests!r})
import comfy.supported_models
import sdxl_models
comfy.supported_models.models.insert(0, sdxl_models.reduced_sdxl_model_config())
NODE_CLASS_MAPPINGS = {{}}
"""


def add_reduced_sdxl_detection(server_base: Path) -> Path:
    """Write :data:`SERVER_CUSTOM_NODE` into a test server's custom_nodes/ (before it starts)."""
    folder = Path(server_base) / "custom_nodes" / "bps_test_reduced_sdxl"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text(SERVER_CUSTOM_NODE.format(tests=str(Path(__file__).resolve().parent)))
    return folder


def write_reduced_sdxl_checkpoints(random_checkpoint, folder: Path) -> dict[str, Path]:
    """Reduced-width SDXL checkpoint files, ``{"eps": path, "v": path}`` (full CLIP-L + CLIP-G and VAE,
    ~1.8 GB each in fp16). Same weights; the v file carries ComfyUI's ``v_pred`` marker. Files
    already in ``folder`` are reused."""
    import torch
    from safetensors.torch import save_file

    paths = {p: Path(folder) / f"sdxl_reduced_{p}.safetensors" for p in ("eps", "v")}
    if all(path.is_file() for path in paths.values()):
        return paths
    sd = random_checkpoint.random_sdxl_state_dict(reduced_sdxl_config(random_checkpoint), seed=0)
    sd = {k: v.contiguous() for k, v in sd.items()}
    Path(folder).mkdir(parents=True, exist_ok=True)
    for prediction, path in paths.items():
        extra = {"v_pred": torch.tensor([])} if prediction == "v" else {}
        tmp = path.with_name(path.name + ".tmp")
        save_file({**sd, **extra}, str(tmp), metadata={"format": "pt", "note": "random weights for tests"})
        tmp.replace(path)
    return paths
