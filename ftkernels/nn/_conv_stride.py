"""Strided 1x1 convs on CPU run at unit stride on the pixels they read.

oneDNN's fp32 weight gradient of a 1x1 conv with stride > 1 and no padding ("reduce to unit
stride") writes past its workspace when the conv has fewer input channels than its channel block
(8 with AVX2, 16 with AVX-512) and runs channels-last: wrong weight gradients (measured: off by 10-100
on a 2-core EPYC, torch 2.13), or a crash (uxlfoundation/oneDNN#6035, open). torch picks channels-last
when x or the weight is. The LoRA A conv of such a layer (RepVGG's 1x1 stem branch on RGB) is always
trained, so its gradient would be garbage. Such a conv reads only ``x[..., ::s0, ::s1]``, so it is the
same conv at stride 1 on that view: exact, and the view holds 1 / (s0 s1) of x (< 16 channels).
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_CHANNELS = 16  # the widest oneDNN channel block (AVX-512); fewer input channels per group can fail


def unit_stride(x: Tensor, weight: Tensor, geom) -> tuple[Tensor, tuple]:
    """``(x[..., ::s0, ::s1], geom at stride 1)`` when ``conv2d(x, weight, geom)`` is a 1x1, unpadded,
    strided conv on CPU with fewer than 16 input channels per group; ``(x, geom)`` otherwise. Both
    give the same conv output and gradients. geom: ``(stride, padding, dilation, groups)``; x
    ``[N, C, H, W]``, weight ``[out, C / groups, kh, kw]``."""
    stride, padding, dilation, groups = geom
    if (
        x.device.type != "cpu"
        or weight.dim() != 4  # Conv1d / Conv3d weight grads checked fine (C = 1..7, channels-last 3d)
        or tuple(weight.shape[-2:]) != (1, 1)
        or all(s == 1 for s in stride)
        or any(p != 0 for p in padding)
        or weight.shape[1] >= MAX_CHANNELS
    ):
        return x, geom
    return x[..., :: stride[0], :: stride[1]], ((1, 1), tuple(padding), tuple(dilation), groups)


def conv_backward(g: Tensor, x: Tensor, weight: Tensor, bias_sizes, geom, mask) -> tuple:
    """``aten.convolution_backward`` of ``conv2d(x, weight, geom)`` for output grad g: ``(grad_x,
    grad_w, grad_b)`` as ``mask`` asks, the weight gradient taken at unit stride where
    :func:`unit_stride` applies (then a second call for grad_x)."""
    stride, padding, dilation, groups = geom
    bwd = torch.ops.aten.convolution_backward.default
    zero = [0] * len(stride)
    xw, geom_w = unit_stride(x, weight, geom) if mask[1] else (x, geom)
    if geom_w is geom:
        return bwd(g, x, weight, bias_sizes, stride, padding, dilation, False, zero, groups, list(mask))
    grad_x = None
    if mask[0]:
        grad_x = bwd(g, x, weight, None, stride, padding, dilation, False, zero, groups, [True, False, False])[0]
    _, grad_w, grad_b = bwd(g, xw, weight, bias_sizes, *geom_w[:3], False, zero, groups, [False, True, bool(mask[2])])
    return grad_x, grad_w, grad_b
