"""BPS steering against the real ComfyUI: the patched model equals a hand-run reference UNet.

The reference runs the SD1.5 UNet's blocks one sub-layer at a time and adds each port's weighted
residual after every ResBlock and SpatialTransformer, as the paper's rule says; it shares no code
with nodes/steering.py.
"""

from __future__ import annotations

import pytest
import torch

import comfy_host
from reference_unet import hand_run_unet

LATENT = 8  # 64x64 pixels keeps an SD1.5 UNet call around a second on 2 cores


def _unet_inputs(batch_rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_rows, 4, LATENT, LATENT, generator=g)
    context = torch.randn(batch_rows, 77, 768, generator=g)
    return x, context


def _forward(steering, model, x, t, context, cond_or_uncond):
    import comfy.model_management
    comfy.model_management.load_models_gpu([model])
    options = steering.transformer_options_for(model)
    options["cond_or_uncond"] = list(cond_or_uncond)
    with torch.no_grad():
        return model.model.diffusion_model(x, t, context=context, transformer_options=options)


def _reference(unet, x, t, context, adapters, control=None):
    """adapters: list of (network, omega list, hint rows (B, C, H, W)) applied with constant weights;
    control: the ``control`` dict a ControlNet hands the UNet, applied where the UNet applies it."""
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    with torch.no_grad():
        emb = unet.time_embed(timestep_embedding(t, 320, repeat_only=False).to(x.dtype))
        residual = {}
        for net, omega, hint in adapters:
            for i, out in enumerate(net(hint, emb)):
                residual[i] = residual.get(i, 0) + omega[i] * out
        return hand_run_unet(unet, x, emb, context, residual, control)


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _hint(batch, channels=1, seed=3):
    return torch.rand(batch, channels, LATENT * 8, LATENT * 8, generator=torch.Generator().manual_seed(seed))


def test_pack_registers_through_comfyuis_loader(pack):
    import folder_paths
    import nodes as comfy_nodes
    for node_id in ("BPSLoader", "BPSApply", "BPSOmegaSchedule", "BPSOmegaPreview", "BPSHintPreprocessor",
                    "BPSConditionFromImage"):
        assert node_id in comfy_nodes.NODE_CLASS_MAPPINGS, node_id
        schema = comfy_nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        assert schema.category == "conditioning/bps" and schema.description
        assert all(i.tooltip for i in schema.inputs), node_id
    assert folder_paths.folder_names_and_paths["bps"][1] == {".safetensors"}
    apply_inputs = [i.id for i in comfy_nodes.NODE_CLASS_MAPPINGS["BPSApply"].GET_SCHEMA().inputs]
    assert apply_inputs == ["model", "bps_adapter", "image", "strength", "start_percent", "end_percent",
                            "omega", "mask", "uncond_multiplier"]


@pytest.mark.parametrize("share_rows", [True, False])
def test_patched_model_matches_reference_under_cfg_batch2(pack, steering, sd15, full_adapter, share_rows):
    bps = pack.bps
    x, context = _unet_inputs(4)               # [cond x2, uncond x2]
    t = torch.tensor([700.0, 700.0, 700.0, 700.0])
    hint = _hint(2)
    steered = steering.attach_bps(sd15, full_adapter, hint, bps.make_schedule(full_adapter.omega),
                                  share_rows=share_rows)
    out = _forward(steering, steered, x, t, context, cond_or_uncond=[0, 1])
    ref = _reference(sd15.model.diffusion_model, x, t, context,
                     [(full_adapter.network, full_adapter.omega, hint.repeat(2, 1, 1, 1))])
    plain = _forward(steering, sd15, x, t, context, [0, 1])
    assert _rel_err(out, ref) < 1e-5
    assert _rel_err(out, plain) > 1e-3  # the adapter really steers


def test_cfg_sharing_runs_bphi_once_per_distinct_row(pack, steering, sd15, full_adapter):
    rows_seen = []
    handle = full_adapter.network.register_forward_pre_hook(lambda m, args: rows_seen.append(args[0].shape[0]))
    try:
        x, context = _unet_inputs(4)
        t = torch.full((4,), 400.0)
        outs = []
        for share in (True, False):
            steered = steering.attach_bps(sd15, full_adapter, _hint(2), pack.bps.make_schedule(full_adapter.omega),
                                          share_rows=share)
            outs.append(_forward(steering, steered, x, t, context, [0, 1]))
    finally:
        handle.remove()
    assert rows_seen == [2, 4]
    assert _rel_err(outs[0], outs[1]) < 1e-5  # fp32: batch-size-dependent kernels differ in the last bits


def test_strength_zero_and_outside_range_are_bit_identical(pack, steering, sd15, full_adapter):
    x, context = _unet_inputs(2)
    t = torch.tensor([999.0, 999.0])
    plain = _forward(steering, sd15, x, t, context, [0, 1])
    for kwargs in ({"strength": 0.0}, {"start": 0.5, "end": 1.0}):
        sched = pack.bps.make_schedule(full_adapter.omega, **kwargs)
        steered = steering.attach_bps(sd15, full_adapter, _hint(1), sched)
        assert torch.equal(_forward(steering, steered, x, t, context, [0, 1]), plain), kwargs


def test_original_model_untouched_and_rerun_identical(pack, steering, sd15, full_adapter):
    x, context = _unet_inputs(2)
    t = torch.tensor([500.0, 500.0])
    before = _forward(steering, sd15, x, t, context, [0, 1])
    keys_before = set(sd15.model.state_dict())
    steered = steering.attach_bps(sd15, full_adapter, _hint(1), pack.bps.make_schedule(full_adapter.omega))
    first = _forward(steering, steered, x, t, context, [0, 1])
    assert set(steered.model.state_dict()) == keys_before  # LoRA/weight-patch keys unchanged
    after = _forward(steering, sd15, x, t, context, [0, 1])
    again = _forward(steering, steered, x, t, context, [0, 1])
    assert torch.equal(before, after)
    assert torch.equal(first, again)
    assert not sd15.object_patches and "patches" not in sd15.model_options["transformer_options"]


def test_two_stacked_adapters_add_up(pack, steering, sd15, full_adapter):
    bps = pack.bps
    second = bps.Adapter(full_adapter.network, [0.5] * 21, full_adapter.config, {}, None, "layout")
    hint_a, hint_b = _hint(1, seed=4), _hint(1, seed=5)
    steered = steering.attach_bps(sd15, full_adapter, hint_a, bps.make_schedule(full_adapter.omega))
    steered = steering.attach_bps(steered, second, hint_b, bps.make_schedule(second.omega))
    x, context = _unet_inputs(2)
    t = torch.tensor([300.0, 300.0])
    out = _forward(steering, steered, x, t, context, [0, 1])
    ref = _reference(sd15.model.diffusion_model, x, t, context,
                     [(full_adapter.network, full_adapter.omega, hint_a.expand(2, -1, -1, -1)),
                      (second.network, second.omega, hint_b.expand(2, -1, -1, -1))])
    assert _rel_err(out, ref) < 1e-5


def test_mask_limits_where_steering_acts(pack, steering, sd15, full_adapter):
    x, context = _unet_inputs(2)
    t = torch.tensor([600.0, 600.0])
    sched = pack.bps.make_schedule(full_adapter.omega)
    zero = steering.attach_bps(sd15, full_adapter, _hint(1), sched, mask=torch.zeros(1, 64, 64))
    full = steering.attach_bps(sd15, full_adapter, _hint(1), sched, mask=torch.ones(1, 64, 64))
    nomask = steering.attach_bps(sd15, full_adapter, _hint(1), sched)
    plain = _forward(steering, sd15, x, t, context, [0, 1])
    assert torch.equal(_forward(steering, zero, x, t, context, [0, 1]), plain)
    assert torch.allclose(_forward(steering, full, x, t, context, [0, 1]),
                          _forward(steering, nomask, x, t, context, [0, 1]), rtol=1e-5, atol=1e-6)


def test_rgb_hint_any_size(pack, steering, sd15, full_adapter):
    bps = pack.bps
    x, context = _unet_inputs(4)
    t = torch.full((4,), 800.0)
    rgb = torch.rand(1, 3, 100, 150)  # other size and aspect: centre-cropped and resized
    steered = steering.attach_bps(sd15, full_adapter, rgb, bps.make_schedule(full_adapter.omega))
    assert torch.isfinite(_forward(steering, steered, x, t, context, [0, 1])).all()
    # Other hint batch sizes: tests/test_nodes_batches.py.


def test_odd_latent_size(pack, steering, sd15, full_adapter):
    import comfy.model_management
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 9, 5, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500.0, 500.0])
    hint = torch.rand(1, 1, 72, 40, generator=g)
    steered = steering.attach_bps(sd15, full_adapter, hint, pack.bps.make_schedule(full_adapter.omega))
    out = _forward(steering, steered, x, t, context, [0, 1])
    ref = _reference(sd15.model.diffusion_model, x, t, context,
                     [(full_adapter.network, full_adapter.omega, hint.expand(2, -1, -1, -1))])
    assert _rel_err(out, ref) < 1e-5


def test_non_sd15_model_is_refused_with_a_clear_error(pack, steering, full_adapter):
    import comfy.model_detection
    import comfy.model_patcher
    config = comfy.model_detection.model_config_from_unet_config({
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False})
    with torch.device("meta"):
        model = config.get_model({})
    patcher = comfy.model_patcher.ModelPatcher(model, load_device="cpu", offload_device="cpu")
    with pytest.raises(ValueError, match=r"cannot steer this MODEL: it is SDXL \(levels 320, 640, 1280.*was trained "
                                         r"for SD1.5 \(levels 320, 640, 1280, 1280.*Connect the MODEL of a SD1.5 checkpoint"):
        steering.attach_bps(patcher, full_adapter, _hint(1), pack.bps.make_schedule(full_adapter.omega))


LORA_TARGET = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_q.weight"


def _lora(rank: int = 4, seed: int = 6) -> dict:
    """A LoRA in the common kohya key format for one attention projection of the UNet."""
    g = torch.Generator().manual_seed(seed)
    name = "lora_unet_" + LORA_TARGET[len("diffusion_model."):-len(".weight")].replace(".", "_")
    return {f"{name}.lora_up.weight": torch.randn(640, rank, generator=g) * 0.5,
            f"{name}.lora_down.weight": torch.randn(rank, 640, generator=g) * 0.5,
            f"{name}.alpha": torch.tensor(float(rank))}


def test_bps_with_a_lora_and_comfyuis_controlnet_matches_the_reference(pack, steering, sd15, full_adapter):
    """LoRA (ComfyUI's loader, a weight patch) + ComfyUI's SD1.5 ControlNet + BPS, sampled with CFG:
    every UNet call equals the hand-run reference on the LoRA-patched weights with the ControlNet's
    residuals and BPS's residuals each added where their own rule puts them."""
    import comfy.sample
    import comfy.sd
    import nodes as comfy_nodes

    bps = pack.bps
    lora_model, _ = comfy.sd.load_lora_for_models(sd15, None, _lora(), 1.0, 0.0)
    assert LORA_TARGET in lora_model.patches
    steered = steering.attach_bps(lora_model, full_adapter, _hint(1), bps.make_schedule(full_adapter.omega))
    control = comfy_host.pack_module(pack, "train.random_checkpoint").random_sd15_controlnet(seed=2)
    g = torch.Generator().manual_seed(7)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    negative = [[torch.randn(1, 77, 768, generator=g), {}]]
    cn_hint = torch.rand(1, LATENT * 8, LATENT * 8, 3, generator=g)
    positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, control, cn_hint, 0.8, 0.0, 1.0)

    unet = sd15.model.diffusion_model
    original_weight = sd15.model.state_dict()[LORA_TARGET].clone()
    calls = []

    def capture(module, args, kwargs):
        x, t = args[0], args[1] if len(args) > 1 else kwargs["timesteps"]
        ctrl = kwargs.get("control")
        assert ctrl, "the ControlNet did not reach the UNet"
        calls.append({"x": x.clone(), "t": t.clone(), "context": kwargs["context"].clone(),
                      "control": {k: [c.clone() if c is not None else None for c in v] for k, v in ctrl.items()}})

    def check(module, args, kwargs, output):
        call = calls[-1]
        call["lora_applied"] = not torch.equal(sd15.model.state_dict()[LORA_TARGET], original_weight)
        rows = call["x"].shape[0]
        adapters = [(full_adapter.network, full_adapter.omega, _hint(1).expand(rows, -1, -1, -1))]
        call["error"] = _rel_err(output, _reference(unet, call["x"], call["t"], call["context"], adapters,
                                                    call["control"]))
        call["bps_effect"] = _rel_err(output, _reference(unet, call["x"], call["t"], call["context"], [],
                                                         call["control"]))
        call["controlnet_effect"] = _rel_err(output, _reference(unet, call["x"], call["t"], call["context"],
                                                                adapters))

    hooks = [unet.register_forward_pre_hook(capture, with_kwargs=True),
             unet.register_forward_hook(check, with_kwargs=True)]
    try:
        latent = torch.zeros(1, 4, LATENT, LATENT)
        noise = torch.randn(latent.shape, generator=g)
        comfy.sample.sample(steered, noise, 1, 7.0, "euler", "normal", positive, negative, latent,
                            disable_pbar=True, seed=0)
    finally:
        for h in hooks:
            h.remove()

    assert calls and sum(c["x"].shape[0] for c in calls) == 2  # the cond and the uncond row
    for call in calls:
        assert call["lora_applied"]
        assert call["error"] < 1e-5, call["error"]
        assert call["bps_effect"] > 1e-3 and call["controlnet_effect"] > 1e-3  # neither is vacuous
    import comfy.model_management
    comfy.model_management.load_models_gpu([sd15])
    assert torch.equal(sd15.model.state_dict()[LORA_TARGET], original_weight)  # the LoRA is undone


def test_residual_cache_is_bit_identical_and_misses_on_every_change(pack, steering, sd15, full_adapter):
    """B_phi runs once per distinct (adapter, hint, timestep, size): a re-run with new noise, a new
    BPSApply with the same image, another strength reuse it bit for bit; a changed image, timestep
    or latent size computes again. Outputs equal the uncached path's exactly."""
    from importlib import import_module
    cache = import_module(f"{pack.__name__}.bps.residual_cache").ResidualCache(2 ** 30)
    bps = pack.bps
    calls = []
    handle = full_adapter.network.register_forward_pre_hook(lambda m, args: calls.append(1))

    def run(hint, strength=1.0, t=700.0, seed=0, size=(LATENT, LATENT), cached=True):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 4, *size, generator=g)
        context = torch.randn(2, 77, 768, generator=g)
        sched = bps.make_schedule(full_adapter.omega, strength=strength)
        model = steering.attach_bps(sd15, full_adapter, hint, sched, cache=cache if cached else None)
        before = len(calls)
        out = _forward(steering, model, x, torch.full((2,), t), context, [0, 1])
        return out, len(calls) - before

    try:
        first, n = run(_hint(1))
        assert n == 1 and cache.misses == 1 and len(cache) == 1
        for kwargs in ({"seed": 1}, {"strength": 0.5, "seed": 2}):      # new noise / weights after the cache
            hit, n = run(_hint(1), **kwargs)                            # a new attachment, an equal image
            plain, n_plain = run(_hint(1), cached=False, **kwargs)
            assert n == 0 and n_plain == 1 and torch.equal(hit, plain), kwargs
        assert cache.hits == 2
        other_image = _hint(1, seed=9)
        for kwargs in ({"hint": other_image}, {"hint": _hint(1), "t": 500.0},
                       {"hint": _hint(1), "size": (LATENT, LATENT - 2)}):
            out, n = run(**kwargs)
            assert n == 1, kwargs                                       # a miss: computed again
            ref, _ = run(cached=False, **kwargs)
            assert torch.equal(out, ref), kwargs
        assert cache.hits == 2 and cache.misses == 4
    finally:
        handle.remove()
