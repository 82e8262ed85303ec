"""Strided 1x1 convs with few input channels on CPU (ftkernels/nn/_conv_stride.py): oneDNN's fp32
weight gradient there is wrong or crashes in channels-last, so LoRAConv2d and MaskedConv2d take it
at unit stride on the pixels the conv reads. Checked in fp32 channels-last against float64 NCHW
(which never takes oneDNN's kernel), on fresh random inputs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ftkernels as ftk
from ftkernels.nn._conv_stride import conv_backward, unit_stride

CL = torch.channels_last


def test_unit_stride_applies_where_the_bug_is_and_only_there():
    x = torch.randn(2, 3, 9, 8)
    w1 = torch.randn(4, 3, 1, 1)
    xs, geom = unit_stride(x, w1, ((2, 2), (0, 0), (1, 1), 1))
    assert geom == ((1, 1), (0, 0), (1, 1), 1) and torch.equal(xs, x[..., ::2, ::2])
    for w, g in (
        (torch.randn(4, 3, 3, 3), ((2, 2), (0, 0), (1, 1), 1)),  # 3x3
        (w1, ((1, 1), (0, 0), (1, 1), 1)),  # stride 1
        (w1, ((2, 2), (1, 1), (1, 1), 1)),  # padded
        (torch.randn(4, 16, 1, 1), ((2, 2), (0, 0), (1, 1), 1)),  # a full channel block
    ):
        xx = torch.randn(2, w.shape[1], 9, 8)
        assert unit_stride(xx, w, g) == (xx, g) and unit_stride(xx, w, g)[1] is g


@pytest.mark.parametrize("stride", [(2, 2), (3, 2)])
@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [True, False, True]])
def test_conv_backward_equals_float64(stride, mask):
    torch.manual_seed(0)
    x64, w64 = torch.randn(3, 5, 13, 11, dtype=torch.float64), torch.randn(7, 5, 1, 1, dtype=torch.float64)
    geom = (stride, (0, 0), (1, 1), 1)
    y = F.conv2d(x64, w64, None, stride)
    g64 = torch.randn_like(y)
    ref = torch.ops.aten.convolution_backward.default(
        g64, x64, w64, [7], list(stride), [0, 0], [1, 1], False, [0, 0], 1, mask
    )  # fmt: skip
    x, w, g = (t.float().contiguous(memory_format=CL) for t in (x64, w64, g64))
    got = conv_backward(g, x, w, [7], geom, mask)
    for a, b, m in zip(got, ref, mask, strict=True):
        if m:  # (ATen may fill an output it was not asked for)
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def _run(layer, x, g, seed=0):
    torch.manual_seed(seed)  # the dropout seed a call draws
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(g.to(y.dtype))
    grads = {n: p.grad.double() for n, p in layer.named_parameters() if p.grad is not None}
    return y.double(), x.grad.double(), grads


@pytest.mark.parametrize("strategy,dropout,dora", [
    ("merged", 0.0, False), ("unmerged", 0.0, False), ("unmerged", 0.3, False),
    ("unmerged", 0.0, True), ("auto", 0.3, True),
])  # fmt: skip
@pytest.mark.parametrize("cin", [1, 3, 7])
def test_lora_conv2d_channels_last_fp32_equals_float64(strategy, dropout, dora, cin):
    """RepVGG's stem branch: a 1x1 stride-2 conv on RGB. Before the workaround the fp32 channels-last
    grad_A was off by 10-100 (or the process died)."""
    torch.manual_seed(1)
    layer = ftk.nn.LoRAConv2d(nn.Conv2d(cin, 24, 1, stride=2), r=4, dropout=dropout, strategy=strategy, dora=dora)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
    layer.train()
    x, g = torch.randn(4, cin, 32, 30), torch.randn(4, 24, 16, 15)
    ref = _run(copy.deepcopy(layer).double(), x.double(), g.double())
    fp32 = copy.deepcopy(layer).to(memory_format=CL)
    got = _run(fp32, x.contiguous(memory_format=CL), g.contiguous(memory_format=CL))
    assert set(got[2]) == set(ref[2]) and "lora_A" in got[2]
    for a, b in zip(got[:2] + tuple(got[2].values()), ref[:2] + tuple(ref[2].values()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("kind", ["rows", "elements"])
def test_masked_conv2d_channels_last_fp32_equals_float64(kind):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 16, 1, stride=2)
    if kind == "rows":
        mask = torch.zeros(16, 3, 1, 1, dtype=torch.bool)
        mask[[1, 4, 9]] = True
    else:
        mask = torch.rand(16, 3, 1, 1) < 0.5
    layer = ftk.nn.MaskedConv2d.from_conv(conv, mask)
    x, g = torch.randn(4, 3, 31, 32), torch.randn(4, 16, 16, 16)
    ref = _run(copy.deepcopy(layer).double(), x.double(), g.double())
    got = _run(
        copy.deepcopy(layer).to(memory_format=CL), x.contiguous(memory_format=CL), g.contiguous(memory_format=CL)
    )
    assert got[2]["weight"].abs().sum() > 0
    for a, b in zip(got[:2] + tuple(got[2].values()), ref[:2] + tuple(ref[2].values()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
