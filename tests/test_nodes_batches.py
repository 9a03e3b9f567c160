"""Batches as ComfyUI hands them to the UNet: hint/mask batches of any size (as core ControlNet takes
them), the CFG uncond rows (uncond_multiplier), and frames under core's context windows."""

from __future__ import annotations

import logging
from importlib import import_module

import pytest
import torch

import comfy_host

LATENT = 8  # 64x64 pixels: an SD1.5 UNet call on a few rows stays around a second on 2 cores


def _hint_fit(pack):
    return import_module(f"{pack.__name__}.nodes.hint_fit")


def _hint(batch, seed=3):
    return torch.rand(batch, 1, LATENT * 8, LATENT * 8, generator=torch.Generator().manual_seed(seed))


def _forward(steering, model, x, t, context, cond_or_uncond, **options):
    import comfy.model_management
    comfy.model_management.load_models_gpu([model])
    opts = steering.transformer_options_for(model)
    opts["cond_or_uncond"] = list(cond_or_uncond)
    opts.update(options)
    with torch.no_grad():
        return model.model.diffusion_model(x, t, context=context, transformer_options=opts)


def _inputs(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, LATENT, LATENT, generator=g), torch.randn(rows, 77, 768, generator=g)


@pytest.mark.parametrize("available,latent,chunks", [(3, 2, 2), (2, 4, 2), (3, 5, 1), (4, 3, 2), (1, 3, 2),
                                                     (3, 3, 2)])
def test_hint_rows_are_those_core_controlnet_broadcasts(pack, comfyui_host, available, latent, chunks):
    """Row by row, the hint each UNet row gets is the one comfy.controlnet.broadcast_image_to gives it."""
    import comfy.controlnet
    hint_fit = _hint_fit(pack)
    rows = latent * chunks
    layout = hint_fit.row_layout(rows, {"cond_or_uncond": [0, 1][:chunks]})
    labels = torch.arange(available, dtype=torch.float32).view(-1, 1, 1, 1)
    core = comfy.controlnet.broadcast_image_to(labels, rows, chunks)
    ours = labels[hint_fit.batch_index(layout, available, "condition image")]
    expected = core.expand(rows, -1, -1, -1) if core.shape[0] == 1 else core  # core keeps a batch of 1 as is
    assert torch.equal(ours, expected), (ours.flatten(), core.flatten())


def test_a_hint_batch_of_another_size_is_cut_or_repeated_with_a_log_line(pack, steering, sd15, full_adapter,
                                                                        caplog):
    bps = pack.bps
    sched = bps.make_schedule(full_adapter.omega)
    x, context = _inputs(4)
    t = torch.full((4,), 700.0)
    hints = _hint(3)
    caplog.set_level(logging.INFO)
    three = _forward(steering, steering.attach_bps(sd15, full_adapter, hints, sched, cache=None),
                     x, t, context, [0, 1])
    assert "the condition image has a batch of 3 but the latent batch is 2: uses its first 2 rows" in caplog.text
    first_two = _forward(steering, steering.attach_bps(sd15, full_adapter, hints[:2], sched, cache=None),
                         x, t, context, [0, 1])
    assert torch.equal(three, first_two)
    # Masks follow the same rule: a batch of 3 masks over 2 samples uses the first two.
    masks = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5))
    cut = _forward(steering, steering.attach_bps(sd15, full_adapter, _hint(1), sched, mask=masks, cache=None),
                   x, t, context, [0, 1])
    exact = _forward(steering, steering.attach_bps(sd15, full_adapter, _hint(1), sched, mask=masks[:2],
                                                   cache=None), x, t, context, [0, 1])
    assert torch.equal(cut, exact)
    assert "the mask has a batch of 3 but the latent batch is 2" in caplog.text


def test_uncond_multiplier_scales_only_the_uncond_rows_after_the_cache(pack, steering, sd15, full_adapter):
    bps = pack.bps
    cache = import_module(f"{pack.__name__}.bps.residual_cache").ResidualCache(2 ** 30)
    calls = []
    handle = full_adapter.network.register_forward_pre_hook(lambda m, args: calls.append(1))
    x, context = _inputs(2)
    t = torch.full((2,), 600.0)
    sched = bps.make_schedule(full_adapter.omega)

    def run(cond_or_uncond=(0, 1), **kwargs):
        model = steering.attach_bps(sd15, full_adapter, _hint(1), sched, cache=cache, **kwargs)
        before = len(calls)
        return _forward(steering, model, x, t, context, cond_or_uncond), len(calls) - before

    try:
        today, n = run()
        assert n == 1
        one, n = run(uncond_multiplier=1.0)
        assert n == 0 and torch.equal(one, today)              # 1.0 is today's path, bit for bit
        half, n = run(uncond_multiplier=0.5)
        assert n == 0 and cache.hits == 2                       # the cache still serves it: no B_phi call
        assert torch.equal(half[0], today[0])                  # the cond row keeps its full residual
        plain = _forward(steering, sd15, x, t, context, [0, 1])
        off, _ = run(uncond_multiplier=0.0)
        torch.testing.assert_close(off[1], plain[1], rtol=1e-5, atol=1e-5)  # uncond row: not steered
        assert torch.equal(off[0], today[0])
        # Halfway: the uncond row is steered as by strength 0.5 (the same residual at half weight).
        sched_half = bps.make_schedule(full_adapter.omega, strength=0.5)
        weaker = _forward(steering, steering.attach_bps(sd15, full_adapter, _hint(1), sched_half, cache=cache),
                          x, t, context, [0, 1])
        torch.testing.assert_close(half[1], weaker[1], rtol=1e-5, atol=1e-5)
        assert (half[1] - today[1]).abs().max() > 1e-2  # and not as by full strength
        # Rows of an uncond-first batch are found by cond_or_uncond, not by position.
        swapped, _ = run(cond_or_uncond=(1, 0), uncond_multiplier=0.0)
        torch.testing.assert_close(swapped[0], plain[0], rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()


def test_apply_bps_node_takes_uncond_multiplier_default_one(pack, full_adapter):
    import nodes as comfy_nodes
    node = comfy_nodes.NODE_CLASS_MAPPINGS["BPSApply"]
    spec = node.INPUT_TYPES()
    kind, options = spec["optional"]["uncond_multiplier"]
    assert kind == "FLOAT" and options["default"] == 1.0 and options["min"] == 0.0 and options["max"] == 1.0


def _context_windowed(model, length, overlap):
    """``model`` with core's ContextWindowsManual node applied (batch dimension, flat fuse)."""
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode
    return ContextWindowsManualNode.execute(model.clone(), context_length=length, context_overlap=overlap,
                                            context_schedule="standard_static", context_stride=1,
                                            closed_loop=False, fuse_method="flat", dim=0, freenoise=False).args[0]


def test_context_windows_steer_every_frame_with_its_own_hint(pack, steering, sd15, full_adapter):
    """Four frames, each with its own sketch, sampled whole and in core's context windows of two
    frames without overlap: every frame is computed once either way, and SD1.5 treats the frames of
    a batch independently, so each frame must come out the same (to batched-kernel rounding). A hint
    taken from the wrong frame would change a frame by far more than that."""
    import comfy.sample
    bps = pack.bps
    frames = 4
    hints = _hint(frames, seed=11)
    sched = bps.make_schedule(full_adapter.omega, strength=2.0)
    g = torch.Generator().manual_seed(1)
    latent = torch.zeros(frames, 4, LATENT, LATENT)
    noise = torch.randn(frames, 4, LATENT, LATENT, generator=g)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    negative = [[torch.randn(1, 77, 768, generator=g), {}]]

    def sample(model):
        return comfy.sample.sample(model, noise, 2, 3.0, "euler", "normal", positive, negative, latent,
                                   disable_pbar=True, seed=1)

    steered = steering.attach_bps(sd15, full_adapter, hints, sched, cache=None)
    whole = sample(steered)
    windowed = sample(_context_windowed(steered, 2, 0))
    # Batch 8 vs 4-6 rows per UNet call: oneDNN's kernels round differently, amplified by CFG 3 over
    # two steps to a few 1e-4 on a handful of the 1024 values.
    tolerance = 2e-3
    torch.testing.assert_close(windowed, whole, rtol=tolerance, atol=tolerance)
    # The check can fail: frame 0's hint on every frame moves frames 1-3 far beyond that tolerance.
    same_hint = sample(_context_windowed(steering.attach_bps(sd15, full_adapter, hints[:1], sched, cache=None),
                                         2, 0))
    for f in range(1, frames):
        moved = float((same_hint[f] - whole[f]).abs().max())
        assert moved > 50 * tolerance, (f, moved)
    torch.testing.assert_close(same_hint[0], whole[0], rtol=tolerance, atol=tolerance)


def test_window_frames_follow_the_window_and_animatediff_sub_indices(pack, comfyui_host):
    """The rows of a windowed call map to the window's frames (and 0.33's causal anchor frame in
    front of them), or AnimateDiff-Evolved's sub_idxs; rows that do not match are left alone."""
    import comfy.context_windows
    hint_fit = _hint_fit(pack)
    window = comfy.context_windows.IndexListContextWindow([4, 5, 6], dim=0, total_frames=8)
    layout = hint_fit.row_layout(6, {"cond_or_uncond": [0, 1], "context_window": window})
    assert layout.samples.tolist() == [4, 5, 6, 4, 5, 6] and layout.latent_batch == 8
    assert layout.uncond.tolist() == [False] * 3 + [True] * 3
    window.causal_anchor_index = 3  # what 0.33's handler sets before slicing the latent
    layout = hint_fit.row_layout(8, {"cond_or_uncond": [1, 0], "context_window": window})
    assert layout.samples.tolist() == [3, 4, 5, 6] * 2 and layout.uncond.tolist() == [True] * 4 + [False] * 4
    ad = hint_fit.row_layout(2, {"ad_params": {"sub_idxs": [7, 9], "full_length": 12}})
    assert ad.samples.tolist() == [7, 9] and ad.latent_batch == 12
    plain = hint_fit.row_layout(4, {"cond_or_uncond": [0, 1], "context_window": window})  # 2 rows a chunk
    assert plain.samples.tolist() == [0, 1, 0, 1] and plain.latent_batch == 2
