"""BPS on SDXL against the real ComfyUI: ComfyUI's own SDXL classes at reduced width (64 channels,
transformer depth 1; the block layout, the 2048-wide text context and the 2816-wide ``y`` are
SDXL's), steered through attach_bps (what Apply BPS runs) and compared with a hand-run reference
(tests/reference_unet.py) that adds each port's residual after every ResBlock and
SpatialTransformer of the 16 ported blocks, and nowhere else.

B_phi is fed ``time_embed(t)`` only, not ``time_embed(t) + label_emb(y)``: the checks below hold the
steered UNet to that (the reference gives the UNet's ResBlocks the full embedding and B_phi the
time-only one), and show the consequence: the CFG halves, whose ``y`` differ, share one B_phi call.
"""

from __future__ import annotations

import pytest
import torch

import comfy_host
import sdxl_models
from reference_unet import SDXL_BLOCK_PORTS, hand_run_unet

LATENT = 8  # 64x64 pixels


@pytest.fixture(scope="module")
def rc(comfyui_host):
    return comfy_host.trainer_pack().train.random_checkpoint


@pytest.fixture(scope="module")
def sdxl_small(rc):
    """Reduced-width SDXL ModelPatcher from ComfyUI's SDXL classes, fp32, seeded random weights."""
    return rc.random_sdxl_model(sdxl_models.reduced_sdxl_config(rc), dtype=torch.float32, seed=0)


@pytest.fixture(scope="module")
def sdxl_adapter(pack, steering, sdxl_small):
    """An adapter for the reduced SDXL whose zero convs are not zero, so it really steers."""
    bps = pack.bps
    shape = steering.model_unet_shape(sdxl_small)
    net = comfy_host.steering_network(bps, bps.BPSConfig.for_unet(shape), seed=1)
    return bps.Adapter(net, list(bps.port_map(shape).default_omega), net.config, {}, None, "sketch", shape)


def _inputs(rows: int, seed: int = 0, in_channels: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_channels, LATENT, LATENT, generator=g)
    context = torch.randn(rows, 77, 2048, generator=g)
    y = torch.randn(rows, 2816, generator=g)
    return x, context, y


def _hint(batch: int, seed: int = 3):
    return torch.rand(batch, 1, LATENT * 8, LATENT * 8, generator=torch.Generator().manual_seed(seed))


def _forward(steering, model, x, t, context, y, cond_or_uncond=(0, 1)):
    import comfy.model_management
    comfy.model_management.load_models_gpu([model])
    options = steering.transformer_options_for(model)
    options["cond_or_uncond"] = list(cond_or_uncond)
    with torch.no_grad():
        return model.model.diffusion_model(x, t, context=context, y=y, transformer_options=options)


def _reference(unet, x, t, context, y, network, omega, hint):
    """The rule by hand: the UNet's ResBlocks get time_embed(t) + label_emb(y), B_phi time_embed(t)."""
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    with torch.no_grad():
        t_emb = unet.time_embed(timestep_embedding(t, unet.model_channels, repeat_only=False).to(x.dtype))
        residual = {i: omega[i] * out for i, out in enumerate(network(hint, t_emb))}
        return hand_run_unet(unet, x, t_emb + unet.label_emb(y), context, residual, block_ports=SDXL_BLOCK_PORTS)


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------- ports

def test_sdxl_has_16_ports_with_the_official_weights(pack, rc):
    """The rule on ComfyUI's full-size SDXL config: 16 ports named after their blocks, 28 additions
    per UNet call, omega 32/16/8 by encoder level, middle 32, decoder 1 (official BPS_XL); B_phi for
    it has SDXL's widths and 404,981,440 parameters (built on the meta device: no memory)."""
    bps = pack.bps
    shape = bps.UNetShape.from_unet_config(rc.SDXL_UNET_CONFIG)
    ports = bps.port_map(shape)
    assert shape.family == "SDXL"
    assert ports.names == ("input_1", "input_2", "input_4", "input_5", "input_7", "input_8", "middle",
                           *(f"output_{n}" for n in range(9)))
    assert [p.channels for p in ports] == [320, 320, 640, 640, 1280, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3
    assert [p.sublayers for p in ports] == [1, 1, 2, 2, 2, 2, 3] + [2] * 6 + [1] * 3 and ports.additions == 28
    assert list(ports.default_omega) == [32.0, 32.0, 16.0, 16.0, 8.0, 8.0, 32.0] + [1.0] * 9
    assert {p.block: p.index for p in ports} == SDXL_BLOCK_PORTS
    with torch.device("meta"):
        net = bps.BPSNetwork(bps.BPSConfig.for_unet(shape))
    assert sum(p.numel() for p in net.parameters()) == 404_981_440
    assert net.config.port_channels() == [p.channels for p in ports]


# ------------------------------------------------------------------------------- injection

@pytest.mark.parametrize("share_rows", [True, False])
def test_steered_sdxl_matches_the_hand_run_reference_under_cfg(pack, steering, sdxl_small, sdxl_adapter, share_rows):
    """[cond x2, uncond x2] with different y per row: the steered UNet equals the reference, which
    adds each port's residual after every ResBlock/transformer of its block and nowhere else."""
    bps = pack.bps
    x, context, y = _inputs(4)
    t = torch.full((4,), 700.0)
    hint = _hint(2)
    steered = steering.attach_bps(sdxl_small, sdxl_adapter, hint, bps.make_schedule(
        sdxl_adapter.omega, ports=sdxl_adapter.ports), share_rows=share_rows)
    out = _forward(steering, steered, x, t, context, y)
    unet = sdxl_small.model.diffusion_model
    ref = _reference(unet, x, t, context, y, sdxl_adapter.network, sdxl_adapter.omega, hint.repeat(2, 1, 1, 1))
    plain = _forward(steering, sdxl_small, x, t, context, y)
    assert _rel_err(out, ref) < 1e-5
    assert _rel_err(out, plain) > 1e-3  # the adapter really steers


def test_each_port_lands_only_in_its_own_block(pack, steering, sdxl_small, sdxl_adapter):
    """One port at a time (all other weights 0) equals the reference with only that port's residual:
    a residual that also landed in another block, or after a Downsample/Upsample, would not."""
    bps = pack.bps
    ports = sdxl_adapter.ports
    x, context, y = _inputs(2, seed=4)
    t = torch.full((2,), 300.0)
    hint = _hint(1, seed=5)
    unet = sdxl_small.model.diffusion_model
    for port in (ports.by_name("input_1"), ports.by_name("input_7"), ports.by_name("middle"),
                 ports.by_name("output_2"), ports.by_name("output_8")):
        omega = [w if i == port.index else 0.0 for i, w in enumerate(sdxl_adapter.omega)]
        steered = steering.attach_bps(sdxl_small, sdxl_adapter, hint, bps.make_schedule(omega, ports=ports))
        out = _forward(steering, steered, x, t, context, y)
        ref = _reference(unet, x, t, context, y, sdxl_adapter.network, omega, hint.repeat(2, 1, 1, 1))
        assert _rel_err(out, ref) < 1e-5, port.name


def test_bphi_gets_the_time_embedding_only_and_the_cfg_halves_share_it(pack, steering, sdxl_small, sdxl_adapter):
    """B_phi's input is time_embed(t), not time_embed(t) + label_emb(y): with different y in the cond
    and uncond halves it still runs once per (timestep, hint row)."""
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    seen = []
    handle = sdxl_adapter.network.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    try:
        x, context, y = _inputs(4, seed=6)
        t = torch.full((4,), 450.0)
        steered = steering.attach_bps(sdxl_small, sdxl_adapter, _hint(2), pack.bps.make_schedule(
            sdxl_adapter.omega, ports=sdxl_adapter.ports), cache=None)
        _forward(steering, steered, x, t, context, y)
    finally:
        handle.remove()
    unet = sdxl_small.model.diffusion_model
    with torch.no_grad():
        t_emb = unet.time_embed(timestep_embedding(t[:2], unet.model_channels, repeat_only=False))
    assert len(seen) == 1 and seen[0].shape[0] == 2
    assert torch.equal(seen[0], t_emb)


def test_strength_zero_is_bit_identical(pack, steering, sdxl_small, sdxl_adapter):
    x, context, y = _inputs(2, seed=7)
    t = torch.tensor([999.0, 999.0])
    plain = _forward(steering, sdxl_small, x, t, context, y)
    for kwargs in ({"strength": 0.0}, {"start": 0.5, "end": 1.0}):
        sched = pack.bps.make_schedule(sdxl_adapter.omega, ports=sdxl_adapter.ports, **kwargs)
        steered = steering.attach_bps(sdxl_small, sdxl_adapter, _hint(1), sched)
        assert torch.equal(_forward(steering, steered, x, t, context, y), plain), kwargs


def test_residual_cache_stays_valid_when_only_the_prompt_changes(pack, steering, sdxl_small, sdxl_adapter):
    """A new prompt changes y and the context but not B_phi's input: the second run takes the cached
    residuals (no B_phi call) and equals an uncached run bit for bit."""
    bps = pack.bps
    cache = comfy_host.pack_module(pack, "bps.residual_cache").ResidualCache(64 * 2 ** 20)
    sched = bps.make_schedule(sdxl_adapter.omega, ports=sdxl_adapter.ports)
    hint = _hint(1, seed=8)
    t = torch.full((2,), 600.0)
    x, context, y = _inputs(2, seed=9)
    _, context2, y2 = _inputs(2, seed=10)
    calls = []
    handle = sdxl_adapter.network.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        cached = steering.attach_bps(sdxl_small, sdxl_adapter, hint, sched, cache=cache)
        _forward(steering, cached, x, t, context, y)
        assert len(calls) == 1
        again = _forward(steering, cached, x, t, context2, y2)
        assert len(calls) == 1  # served from the cache
        uncached = steering.attach_bps(sdxl_small, sdxl_adapter, hint, sched, cache=None)
        assert torch.equal(again, _forward(steering, uncached, x, t, context2, y2))
    finally:
        handle.remove()


def test_sdxl_inpainting_takes_sdxl_adapters(pack, steering, rc, sdxl_adapter):
    """SDXL inpainting (9 input channels, ComfyUI's SDXL class with its inpaint concat): same hidden
    states, so the SDXL adapter steers it, exactly as the rule says."""
    inpaint = rc.random_sdxl_model(rc.sdxl_unet_config(**sdxl_models.REDUCED_SDXL_CHANGES, in_channels=9),
                                   dtype=torch.float32, seed=0)
    x, context, y = _inputs(2, seed=11, in_channels=9)
    t = torch.full((2,), 250.0)
    hint = _hint(1, seed=12)
    steered = steering.attach_bps(inpaint, sdxl_adapter, hint, pack.bps.make_schedule(
        sdxl_adapter.omega, ports=sdxl_adapter.ports))
    out = _forward(steering, steered, x, t, context, y)
    ref = _reference(inpaint.model.diffusion_model, x, t, context, y, sdxl_adapter.network, sdxl_adapter.omega,
                     hint.repeat(2, 1, 1, 1))
    assert _rel_err(out, ref) < 1e-5


# -------------------------------------------------------------------------------- refusals

def _meta_model(config_class: str, unet_config: dict):
    import comfy.model_patcher
    import comfy.supported_models
    config = getattr(comfy.supported_models, config_class)(dict(unet_config))
    with torch.device("meta"):
        model = config.get_model({})
    return comfy.model_patcher.ModelPatcher(model, load_device="cpu", offload_device="cpu")


def _meta_adapter(bps, shape):
    with torch.device("meta"):
        net = bps.BPSNetwork(bps.BPSConfig.for_unet(shape))
    return bps.Adapter(net, list(bps.port_map(shape).default_omega), net.config, {}, None, "sketch", shape)


def test_an_sd15_adapter_on_sdxl_and_the_reverse_are_refused_naming_both(pack, steering, rc):
    """Full-size models and adapters on the meta device: the check comes before any tensor moves."""
    bps = pack.bps
    sdxl = _meta_model("SDXL", rc.SDXL_UNET_CONFIG)
    sd15 = _meta_model("SD15", rc.SD15_UNET_CONFIG)
    sd15_adapter = _meta_adapter(bps, bps.SD15_SHAPE)
    sdxl_adapter = _meta_adapter(bps, bps.UNetShape.from_unet_config(rc.SDXL_UNET_CONFIG))
    hint = torch.zeros(1, 1, 64, 64)
    with pytest.raises(ValueError, match=r"it is SDXL \(.*trained for SD1\.5 \(.*SD1\.5 checkpoint"):
        steering.attach_bps(sdxl, sd15_adapter, hint, bps.make_schedule(sd15_adapter.omega))
    with pytest.raises(ValueError, match=r"it is SD1\.5 \(.*trained for SDXL \(.*SDXL checkpoint"):
        steering.attach_bps(sd15, sdxl_adapter, hint, bps.make_schedule(sdxl_adapter.omega, ports=sdxl_adapter.ports))


def test_koala_700m_without_a_middle_block_is_refused_by_name(pack, steering, rc):
    """KOALA-700M (ComfyUI detects it as an SDXL variant) has no middle block: the rule has no middle
    port for it, and Apply BPS says so instead of failing in a forward pass."""
    import comfy.model_detection
    config = rc.sdxl_unet_config(num_res_blocks=[1, 1, 1], transformer_depth=[0, 2, 5],
                                 transformer_depth_output=[0, 0, 2, 2, 5, 5], transformer_depth_middle=-2)
    assert type(comfy.model_detection.model_config_from_unet_config(dict(config))).__name__ == "KOALA_700M"
    model = _meta_model("KOALA_700M", config)
    adapter = _meta_adapter(pack.bps, pack.bps.UNetShape.from_unet_config(rc.SDXL_UNET_CONFIG))
    with pytest.raises(ValueError, match=r"BPS cannot steer this MODEL: it is KOALA_700M.*no middle block"):
        steering.attach_bps(model, adapter, torch.zeros(1, 1, 64, 64),
                            pack.bps.make_schedule(adapter.omega, ports=adapter.ports))


@pytest.mark.parametrize("variant", ["SSD1B", "Segmind_Vega", "KOALA_1B"])
def test_an_sdxl_adapter_on_a_distilled_sdxl_is_refused_naming_both(pack, steering, rc, variant):
    """SSD-1B and Vega (a lone ResBlock in the middle, fewer transformers) and KOALA-1B (one ResBlock
    per level) are UNets of other shapes: an adapter trained for SDXL does not fit them."""
    layouts = {
        "SSD1B": {"transformer_depth": [0, 0, 2, 2, 4, 4], "transformer_depth_output": [0, 0, 0, 1, 1, 2, 10, 4, 4],
                  "transformer_depth_middle": -1},
        "Segmind_Vega": {"transformer_depth": [0, 0, 1, 1, 2, 2], "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
                         "transformer_depth_middle": -1},
        "KOALA_1B": {"num_res_blocks": [1, 1, 1], "transformer_depth": [0, 2, 6],
                     "transformer_depth_output": [0, 0, 2, 2, 6, 6], "transformer_depth_middle": 6},
    }
    model = _meta_model(variant, rc.sdxl_unet_config(**layouts[variant]))
    adapter = _meta_adapter(pack.bps, pack.bps.UNetShape.from_unet_config(rc.SDXL_UNET_CONFIG))
    with pytest.raises(ValueError, match=r"BPS cannot steer this MODEL: it is .*but the adapter was trained for "
                                         r"SDXL \("):
        steering.attach_bps(model, adapter, torch.zeros(1, 1, 64, 64),
                            pack.bps.make_schedule(adapter.omega, ports=adapter.ports))


# ------------------------------------------------------------------ the nodes, with 16 ports

def _node(node_id):
    import nodes as comfy_nodes
    return comfy_nodes.NODE_CLASS_MAPPINGS[node_id]


def test_omega_nodes_masks_and_chaining_work_with_the_16_sdxl_ports(pack, steering, sdxl_small, sdxl_adapter):
    """BPS Omega Schedule (preset, multipliers, overrides by SDXL port name, a curve) into Apply BPS,
    chained with a second Apply BPS under a mask, equals the reference with both adapters' weighted
    residuals (the second one masked); an SD1.5-only port name is refused naming SDXL's ports; BPS
    Omega Preview plots the 16 ports."""
    bps = pack.bps
    spec = _node("BPSOmegaSchedule").execute("EMD", 1.0, 0.5, 2.0, "input_1=3, output_8=0", "linear_down",
                                             "").args[0]
    x, context, y = _inputs(2, seed=13)
    t = torch.full((2,), 500.0)
    hint1, hint2 = _hint(1, seed=14), _hint(1, seed=15)
    image1, image2 = hint1.movedim(1, -1).repeat(1, 1, 1, 3), hint2.movedim(1, -1).repeat(1, 1, 1, 3)
    mask = torch.zeros(LATENT * 8, LATENT * 8)
    mask[:, : LATENT * 4] = 1.0  # left half
    apply = _node("BPSApply")
    first = apply.execute(sdxl_small, sdxl_adapter, image1, 1.0, 0.0, 1.0, omega=spec).args[0]
    second = apply.execute(first, sdxl_adapter, image2, 0.5, 0.0, 1.0, mask=mask).args[0]
    out = _forward(steering, second, x, t, context, y)

    ports = sdxl_adapter.ports
    sched1 = bps.make_schedule(sdxl_adapter.omega, spec, ports=ports)
    sched2 = bps.make_schedule(sdxl_adapter.omega, strength=0.5, ports=ports)
    progress = comfy_host.pack_module(pack, "bps.schedule").progress_from_timestep(500.0)
    w1, w2 = sched1.weights_at(progress), sched2.weights_at(progress)
    curve = 1.0 - progress  # linear_down
    assert w1[ports.by_name("input_1").index] == pytest.approx(3 * curve)   # the override, then the curve
    assert w1[ports.by_name("output_8").index] == 0.0
    middle = ports.by_name("middle").index
    assert w1[middle] == pytest.approx(sdxl_adapter.omega[middle] * 0.5 * curve)
    assert w1[ports.by_name("output_0").index] == pytest.approx(1 * 2 * curve)

    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
    import torch.nn.functional as F
    unet = sdxl_small.model.diffusion_model
    with torch.no_grad():
        t_emb = unet.time_embed(timestep_embedding(t, unet.model_channels, repeat_only=False))
        residual = {}
        for hint, weights, m in ((hint1, w1, None), (hint2, w2, mask)):
            for i, r in enumerate(sdxl_adapter.network(hint.repeat(2, 1, 1, 1), t_emb)):
                r = weights[i] * r
                if m is not None:
                    r = r * F.interpolate(m[None, None], size=r.shape[-2:], mode="bilinear", align_corners=False)
                residual[i] = residual.get(i, 0) + r
        ref = hand_run_unet(unet, x, t_emb + unet.label_emb(y), context, residual, block_ports=SDXL_BLOCK_PORTS)
    assert _rel_err(out, ref) < 1e-5

    bad = _node("BPSOmegaSchedule").execute("paper", 1.0, 1.0, 1.0, "input_10=0", "constant", "").args[0]
    with pytest.raises(ValueError, match=r"input_10.*output_8"):
        apply.execute(sdxl_small, sdxl_adapter, image1, 1.0, 0.0, 1.0, omega=bad)
    plot = _node("BPSOmegaPreview").execute(1.0, 0.0, 1.0, 512, 320, omega=spec, bps_adapter=sdxl_adapter).args[0]
    assert plot.shape == (1, 320, 512, 3) and float(plot.std()) > 0
