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


def _hidden_states(model, ports, latent: int, context_dim: int, y_dim: int | None) -> dict[str, torch.Size]:
    unet = model.model.diffusion_model
    seen: dict[str, torch.Size] = {}
    hooks = [unet.get_submodule(p.module_path).register_forward_hook(
        lambda m, a, out, name=p.name: seen.setdefault(name, out.shape)) for p in ports]
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
        # Output blocks that end in an Upsample hand the next block a map twice as large; the
        # residual is added before it, at the block's own resolution (the Upsample is not injected).
        up = 2 if shape.output_blocks[port.block[1]][-1:] == ("up",) and port.group == "decoder" else 1
        assert seen[port.name] == (1, port.channels, latent * up // port.downsample,
                                   latent * up // port.downsample), port
        assert port.sublayers == sum(k in ("res", "attn") for k in
                                     (shape.middle_block if port.group == "middle"
                                      else shape.input_blocks[port.block[1]] if port.group == "encoder"
                                      else shape.output_blocks[port.block[1]]))


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
