"""The base models bench/bench_server.py can benchmark, and the random model files each one needs.

For each base: the names the server's model folders list (checkpoint, adapter, ControlNet), and
writers for a full-size adapter file (random non-zero weights, fp16, as a trained or converted
adapter is) and a ControlNet file built from ComfyUI's own ControlNet class for that base's UNet.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ServerBase:
    """One base model family as the server benchmark uses it."""

    key: str  #: the --base value
    label: str  #: as the results say it
    checkpoint_name: str  #: the name the checkpoint is linked under in models/checkpoints
    adapter_name: str  #: models/bps
    controlnet_name: str  #: models/controlnet
    ckpt_env: str | None  #: environment variable naming a checkpoint to use by default
    ckpt_writer: str  #: the train.random_checkpoint function that writes a random checkpoint

    def unet_shape(self, bps):
        """The UNet layout the adapter is built for (bps.SD15_SHAPE or bps.SDXL_SHAPE)."""
        return bps.SDXL_SHAPE if self.key == "sdxl" else bps.SD15_SHAPE

    def unet_config(self, random_checkpoint) -> dict:
        """ComfyUI's unet_config of this base, for the ControlNet."""
        return random_checkpoint.SDXL_UNET_CONFIG if self.key == "sdxl" else random_checkpoint.SD15_UNET_CONFIG


BASES = {
    # The SD1.5 names predate --base; kept so a --keep folder from earlier runs is reused.
    "sd15": ServerBase("sd15", "SD1.5", "sd15.safetensors", "bench_sketch.safetensors",
                       "bench_control_sd15.safetensors", "BPS_TEST_SD15_CKPT", "write_random_sd15_checkpoint"),
    "sdxl": ServerBase("sdxl", "SDXL", "sdxl.safetensors", "bench_sketch_sdxl.safetensors",
                       "bench_control_sdxl.safetensors", None, "write_random_sdxl_checkpoint"),
}


def write_adapter(pack, base: ServerBase, path: Path) -> None:
    """A full-size adapter for ``base`` whose zero convs are not zero (so it really steers), as fp16.

    The network follows the port rule for the base's UNet (``BPSConfig.for_unet``): 21 ports for
    SD1.5, 16 for SDXL.
    """
    import comfy_host

    bps = pack.bps
    shape = base.unet_shape(bps)
    net = comfy_host.steering_network(bps, bps.BPSConfig.for_unet(shape), seed=1)
    bps.save_adapter(path, net, dtype=torch.float16, unet=shape)
    del net
    gc.collect()


def write_controlnet(pack, base: ServerBase, path: Path) -> None:
    """ComfyUI's ControlNet for ``base`` with random weights, as an fp16 file ControlNetLoader reads.

    Built in fp16 (same draws as fp32, rounded): the SDXL one is about 2.5 GB then, 5 GB in fp32.
    """
    from safetensors.torch import save_file

    rc = pack.train.random_checkpoint
    control = rc.random_controlnet_network(base.unet_config(rc), seed=2, dtype=torch.float16)
    save_file({k: v.contiguous() for k, v in control.state_dict().items()}, str(path))
    del control
    gc.collect()
