"""B_phi shapes, zero initialisation, hint validation and training-mode behaviour (no ComfyUI)."""

import pytest
import torch

from bps.errors import HintError
from bps.network import BPSConfig, BPSNetwork
from bps.ports import PORTS

TINY = BPSConfig(model_channels=32, time_embed_dim=64)


def _randomise(net: BPSNetwork, seed: int = 0) -> BPSNetwork:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def test_sd15_config_matches_port_table():
    cfg = BPSConfig()
    assert cfg.is_sd15_layout and cfg.num_ports == len(PORTS) == 21
    assert cfg.in_channels == 64
    assert cfg.port_channels() == [p.channels for p in PORTS]
    assert cfg.port_downsample() == [p.downsample for p in PORTS]
    assert BPSConfig(hint_channels=3).in_channels == 192
    assert BPSConfig(hint_channels=3, extra_channels=1).in_channels == 256
    assert not TINY.is_sd15_layout


def test_config_round_trips_and_rejects_garbage():
    for cfg in (BPSConfig(), TINY, BPSConfig(hint_channels=3, extra_channels=1, extra_downscale=16)):
        assert BPSConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown BPS config keys"):
        BPSConfig.from_dict({**TINY.to_dict(), "heads": 8})
    with pytest.raises(ValueError, match="multiple of 32"):
        BPSConfig(model_channels=48)


def test_fresh_network_outputs_exact_zeros_with_port_shapes():
    net = BPSNetwork(TINY)
    outs = net(torch.rand(2, 1, 64, 96), torch.randn(2, 64))
    assert len(outs) == TINY.num_ports
    for out, ch, down in zip(outs, TINY.port_channels(), TINY.port_downsample()):
        assert out.shape == (2, ch, -(-8 // down), -(-12 // down))  # stride-2 convs round up
        assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("size", [(72, 40), (24, 24), (136, 24)])
def test_odd_latent_sizes_follow_the_unet_resolutions(size):
    h, w = size[0] // 8, size[1] // 8
    outs = _randomise(BPSNetwork(TINY))(torch.rand(1, 1, *size), torch.randn(1, 64))
    expected = [h, w]
    encoder_sizes = [tuple(expected)]
    for _ in range(3):
        expected = [(expected[0] + 1) // 2, (expected[1] + 1) // 2]  # stride-2 conv, padding 1
        encoder_sizes.append(tuple(expected))
    got = [tuple(o.shape[-2:]) for o in outs]
    assert got[:8] == [encoder_sizes[i // 2] for i in range(8)]
    assert got[8] == encoder_sizes[3]
    assert got[9:] == [encoder_sizes[3 - i // 3] for i in range(12)]


def test_outputs_depend_on_hint_and_time():
    net = _randomise(BPSNetwork(TINY))
    hint, emb = torch.rand(1, 1, 32, 32), torch.randn(1, 64)
    base = net(hint, emb)
    other_hint = net(torch.rand(1, 1, 32, 32), emb)
    other_time = net(hint, torch.randn(1, 64))
    assert all(not torch.equal(a, b) for a, b in zip(base, other_hint))
    assert all(not torch.equal(a, b) for a, b in zip(base, other_time))


def test_rows_are_independent():
    net = _randomise(BPSNetwork(TINY)).eval()
    hint, emb = torch.rand(3, 1, 32, 32), torch.randn(3, 64)
    batched = net(hint, emb)
    single = net(hint[1:2], emb[1:2])
    for a, b in zip(batched, single):
        torch.testing.assert_close(a[1:2], b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hint, emb, match", [
    (torch.rand(1, 3, 32, 32), torch.randn(1, 64), "3 channels but this adapter expects 1"),
    (torch.rand(1, 1, 30, 32), torch.randn(1, 64), "multiples of 8"),
    (torch.rand(1, 32, 32), torch.randn(1, 64), "4-D tensor"),
    (torch.rand(2, 1, 32, 32), torch.randn(3, 64), "batch=2"),
    (torch.rand(1, 1, 32, 32), torch.randn(1, 65), "time embedding"),
])
def test_bad_hints_get_clear_errors(hint, emb, match):
    with pytest.raises(HintError, match=match):
        BPSNetwork(TINY)(hint, emb)


def test_style_variant_takes_the_extra_map_packed_or_separate():
    cfg = BPSConfig(hint_channels=3, extra_channels=1, model_channels=32, time_embed_dim=64)
    net = _randomise(BPSNetwork(cfg))
    rgb, extra, emb = torch.rand(1, 3, 32, 32), torch.rand(1, 1, 32, 32), torch.randn(1, 64)
    packed = net(torch.cat([rgb, extra], dim=1), emb)
    separate = net(rgb, emb, extra=extra)
    assert all(torch.equal(a, b) for a, b in zip(packed, separate))
    with pytest.raises(HintError, match="needs an extra map"):
        net(rgb, emb)
    wide = BPSNetwork(BPSConfig(hint_channels=3, extra_channels=1, extra_downscale=16,
                                model_channels=32, time_embed_dim=64))
    assert len(wide(rgb, emb, extra=torch.rand(1, 1, 64, 64))) == 21
    with pytest.raises(HintError, match="must be 64x64"):
        wide(rgb, emb, extra=extra)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    hint, emb = torch.rand(2, 1, 32, 32), torch.randn(2, 64)
    grads = []
    for ckpt in (False, True):
        net = _randomise(BPSNetwork(TINY)).train()
        net.gradient_checkpointing = ckpt
        loss = sum((o.float() ** 2).mean() for o in net(hint, emb))
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_half_precision_weights_compute_in_their_dtype():
    net = _randomise(BPSNetwork(TINY)).to(torch.bfloat16)
    outs = net(torch.rand(1, 1, 32, 32), torch.randn(1, 64))
    assert net.dtype == torch.bfloat16 and all(o.dtype == torch.bfloat16 for o in outs)
    assert all(torch.isfinite(o.float()).all() for o in outs)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_channels_last_hint_runs_every_conv_contiguous(one_thread, channels):
    """ComfyUI's IMAGE is (B, H, W, C), so a hint arrives as a channels-last view; convolutions fed
    that re-lay their weights out on every call (twice as slow). Every conv must see NCHW input,
    with the same results as a contiguous hint."""
    net = _randomise(BPSNetwork(BPSConfig(hint_channels=channels, model_channels=32, time_embed_dim=64))).eval()
    image = torch.rand(2, 16, 24, channels, generator=torch.Generator().manual_seed(1))  # (B, H, W, C)
    view = image.movedim(-1, 1)
    assert not view.is_contiguous() or channels == 1
    layouts = []
    hooks = [m.register_forward_pre_hook(lambda m, args: layouts.append(args[0].is_contiguous()))
             for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    emb = torch.randn(2, 64)
    try:
        with torch.no_grad():
            outs = net(view, emb)
    finally:
        for h in hooks:
            h.remove()
    assert layouts and all(layouts)
    assert all(o.is_contiguous() for o in outs)
    with torch.no_grad():
        ref = net(view.contiguous(memory_format=torch.contiguous_format).clone(), emb)
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b)
