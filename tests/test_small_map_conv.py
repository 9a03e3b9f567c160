"""SmallMapConv2d: the matrix path agrees with PyTorch's convolution and is taken only where meant."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bps import small_map_conv
from bps.network import BPSConfig, BPSNetwork
from bps.small_map_conv import SmallMapConv2d


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True) -> SmallMapConv2d:
    torch.manual_seed(cin * 31 + cout + kernel + stride)
    return SmallMapConv2d(cin, cout, kernel, stride=stride, padding=padding, bias=bias)


@pytest.mark.parametrize("batch,cin,cout,size,kernel,stride,padding,bias", [
    (1, 64, 48, 8, 3, 1, 1, True),     # a 3x3 conv on an 8x8 map
    (2, 32, 16, 8, 3, 2, 1, True),     # Downsample: stride 2
    (1, 40, 24, 5, 3, 2, 1, False),    # odd side, rounded up, no bias
    (3, 24, 8, 4, 1, 1, 0, True),      # 1x1 skip conv, batch 3
    (1, 16, 16, 1, 3, 1, 1, True),     # a 1x1 map
])
def test_matrix_path_matches_pytorch_convolution(batch, cin, cout, size, kernel, stride, padding, bias):
    conv = _conv(cin, cout, kernel, stride, padding, bias)
    x = torch.randn(batch, cin, size, size)
    with torch.no_grad():
        got = conv(x)
        want = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=padding)
        assert conv._matrix_output_size(x, conv.weight) == tuple(want.shape[-2:])
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_small_cpu_float32_inference_takes_the_matrix_path():
    conv = _conv(8, 8, 3, padding=1)
    small = torch.randn(2, 8, 8, 8)                       # 2 * 8 * 8 = 128 output pixels: the limit
    large = torch.randn(1, 8, 16, 16)                     # 256
    assert small_map_conv.MAX_MATRIX_PIXELS == 128
    with torch.no_grad():
        assert conv._matrix_output_size(small, conv.weight) is not None
        assert conv._matrix_output_size(large, conv.weight) is None
        assert conv._matrix_output_size(small.double(), conv.weight.double()) is None
        assert conv._matrix_output_size(small.bfloat16(), conv.weight.bfloat16()) is None
    # Recording gradients (training): PyTorch's convolution and its backward.
    assert conv._matrix_output_size(small, conv.weight) is None
    grouped = SmallMapConv2d(8, 8, 3, padding=1, groups=2)
    with torch.no_grad():
        assert grouped._matrix_output_size(small, grouped.weight) is None


def test_training_gradients_are_pytorch_convolution_gradients():
    conv = _conv(8, 4, 3, padding=1)
    ref = nn.Conv2d(8, 4, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(1, 8, 4, 4)
    conv(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert torch.equal(conv.weight.grad, ref.weight.grad) and torch.equal(conv.bias.grad, ref.bias.grad)


def test_network_keeps_its_state_dict_and_agrees_with_plain_convolutions(monkeypatch):
    cfg = BPSConfig(model_channels=32, time_embed_dim=64)
    net = BPSNetwork(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, SmallMapConv2d) for m in convs)
    assert all(k.endswith(("weight", "bias")) for k in net.state_dict())
    hint, emb = torch.rand(1, 1, 64, 64), torch.randn(1, 64)   # 8x8 latent: the deep levels take the matrix path
    with torch.no_grad():
        fast = net(hint, emb)
        monkeypatch.setattr(small_map_conv, "MAX_MATRIX_PIXELS", 0)
        plain = net(hint, emb)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
