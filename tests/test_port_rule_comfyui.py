"""The port rule against ComfyUI's real UNets: every port's width and scale is the hidden state's
at that block, and an adapter is refused on a UNet of another shape, naming both."""

from __future__ import annotations

import pytest
import torch

SD15_LAYOUT = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
               "legacy": False, "adm_in_channels": None, "in_channels": 4, "num_res_blocks": [2, 2, 2, 2],
               "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
               "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
               "num_heads": 8, "num_head_channels": -1, "transformer_depth_output": [1] * 9 + [0, 0, 0],
               "use_temporal_attention": False, "use_temporal_resblock": False}
# SDXL's block layout (transformers on levels 1 and 2, pooled/size vector through label_emb), one
# transformer layer deep instead of 2/10: a depth-N transformer is one module, so the ports are SDXL's.
SDXL_LAYOUT = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
               "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
               "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 1, 1], "channel_mult": [1, 2, 4],
               "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048,
               "num_head_channels": 16, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
               "use_temporal_attention": False, "use_temporal_resblock": False}


def _model(layout: dict, model_channels: int, family: str):
    import comfy.model_patcher
    import comfy.supported_models
    config = getattr(comfy.supported_models, family)({**layout, "model_channels": model_channels})
    torch.manual_seed(0)
    model = config.get_model({})
    return comfy.model_patcher.ModelPatcher(model, load_device="cpu", offload_device="cpu")


@pytest.fixture(scope="module")
def sd15_small(comfyui_host):
    return _model(SD15_LAYOUT, 32, "SD15")


@pytest.fixture(scope="module")
def sdxl_small(comfyui_host):
    return _model(SDXL_LAYOUT, 32, "SDXL")


def _hidden_states(model, ports, latent: int, context_dim: int, y_dim: int | None) -> dict[str, list]:
    """Output shape of every ResBlock/SpatialTransformer of every ported block, by port: where the
    residuals are added. (ComfyUI runs a block's layers one by one, so the hooks sit on the layers.)"""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    unet = model.model.diffusion_model
    seen: dict[str, list] = {p.name: [] for p in ports}
    hooks = [layer.register_forward_hook(lambda m, a, out, name=p.name: seen[name].append(tuple(out.shape)))
             for p in ports for layer in unet.get_submodule(p.module_path).children()
             if isinstance(layer, (ResBlock, SpatialTransformer))]
    try:
        with torch.no_grad():
            kwargs = {"y": torch.zeros(1, y_dim)} if y_dim else {}
            unet(torch.zeros(1, 4, latent, latent), torch.tensor([500.0]),
                 context=torch.zeros(1, 77, context_dim), **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_ports_match_the_real_hidden_states(pack, steering, sd15_small, sdxl_small, which):
    model, context_dim, y_dim, family = ((sd15_small, 768, None, "SD1.5") if which == "sd15"
                                        else (sdxl_small, 2048, 2816, "SDXL"))
    shape = steering.model_unet_shape(model)
    assert shape.family.startswith(family + "-layout UNet at model_channels 32")
    ports = pack.bps.ports.port_map(shape)
    assert len(ports) == (21 if which == "sd15" else 16)
    # The ComfyUI config's description of the same UNet gives the same shape.
    assert pack.bps.unet_shape.UNetShape.from_unet_config(model.model.model_config.unet_config) == shape
    latent = 16
    seen = _hidden_states(model, ports, latent, context_dim, y_dim)
    for port in ports:
        side = latent // port.downsample
        assert seen[port.name] == [(1, port.channels, side, side)] * port.sublayers, port


def test_adapters_of_another_unet_are_refused_naming_both(pack, steering, sd15, sd15_small):
    bps = pack.bps
    small_shape = steering.model_unet_shape(sd15_small)
    small = bps.Adapter(bps.BPSNetwork(bps.BPSConfig.for_unet(small_shape)), list(bps.port_map(small_shape)
                        .default_omega), bps.BPSConfig.for_unet(small_shape), {}, None, "sketch", small_shape)
    full_shape = steering.model_unet_shape(sd15)
    assert full_shape == bps.unet_shape.SD15_SHAPE
    with torch.device("meta"):
        full_net = bps.BPSNetwork(bps.BPSConfig())
    full = bps.Adapter(full_net, list(bps.PAPER_OMEGA), full_net.config, {}, None, "sketch")
    hint = torch.rand(1, 1, 64, 64)
    with pytest.raises(ValueError, match=r"it is SD1.5 \(.*but the adapter was trained for SD1.5-layout UNet at "
                                         r"model_channels 32"):
        steering.attach_bps(sd15, small, hint, bps.make_schedule(small.omega))
    with pytest.raises(ValueError, match=r"it is SD1.5-layout UNet at model_channels 32 .*trained for SD1.5 \("):
        steering.attach_bps(sd15_small, full, hint, bps.make_schedule(full.omega))
    # The small adapter on its own UNet attaches.
    steered = steering.attach_bps(sd15_small, small, hint, bps.make_schedule(small.omega))
    assert steered is not sd15_small
