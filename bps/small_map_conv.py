"""A Conv2d that computes tiny feature maps on the CPU as one matrix product.

B_phi's deepest levels are 1280-2560 channels wide on 4x4 to 8x8 maps (a 256x256 image) or 8x8
(512x512). There, PyTorch's CPU convolution (oneDNN) re-lays each weight out on every call and
spends more time moving the weight than multiplying with it: a 3x3 conv of ``[1, 2560, 4, 4]``
ran at 17 GFLOP/s where the same product as unfold + matrix multiply ran at 76 (2 cores, torch
2.13), and ``[1, 1280, 8, 8]`` at 61 against 128. From 16x16 up oneDNN is as fast or faster, so
only small outputs take the matrix path (``bench/bench_network.py`` times B_phi as a whole:
1.14 s -> 0.66 s at 256x256).

Only inference takes the matrix path (no gradient is being recorded), so training keeps
PyTorch's convolution and its memory-lean backward; GPUs and other dtypes keep it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Largest ``batch * out_height * out_width`` computed as a matrix product. At 8x8 (64) and a batch
#: of 2 (128) the product is 1.4-4x faster than oneDNN; at 16x16 they are level, and from 16x16 at
#: 640 channels down oneDNN wins.
MAX_MATRIX_PIXELS = 128


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state dict) whose CPU float32 inference on small
    outputs runs as ``weight @ unfold(x)``: the same sums in another order, so results agree with
    ``nn.Conv2d`` to float32 rounding, not bit for bit."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        out_size = self._matrix_output_size(x, weight)
        if out_size is None:
            return super()._conv_forward(x, weight, bias)
        return self._matrix_forward(x, weight, bias, *out_size)

    def _matrix_output_size(self, x: Tensor, weight: Tensor) -> tuple[int, int] | None:
        """The output's (height, width) when this call takes the matrix path, else None."""
        if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.ndim != 4:
            return None
        if self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return None
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return None
        out_h = _out_size(x.shape[-2], self.kernel_size[0], self.stride[0], self.padding[0])
        out_w = _out_size(x.shape[-1], self.kernel_size[1], self.stride[1], self.padding[1])
        return (out_h, out_w) if 0 < x.shape[0] * out_h * out_w <= MAX_MATRIX_PIXELS else None

    def _matrix_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, out_h: int, out_w: int) -> Tensor:
        b = x.shape[0]
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (b, c*kh*kw, L)
        # One GEMM over the whole batch: (out, c*kh*kw) @ (c*kh*kw, b*L).
        cols = cols.transpose(0, 1).reshape(cols.shape[1], b * out_h * out_w)
        flat = weight.reshape(weight.shape[0], -1)
        out = torch.addmm(bias[:, None], flat, cols) if bias is not None else flat @ cols
        return out.reshape(weight.shape[0], b, out_h, out_w).transpose(0, 1).contiguous()
