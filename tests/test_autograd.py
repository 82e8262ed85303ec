"""``ftkernels.ops._autograd.first_order``: once_differentiable's semantics without its cost when grad
mode is off, on the three eager nodes that use it (LoRA Linear, shared-input groups, LoReFT)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ftkernels as ftk
from ftkernels.ops._autograd import first_order


def _lora_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5))
    m = ftk.apply_lora(m, ["0"], r=2)
    nn.init.normal_(m[0].lora_B)
    return m


def _group_model():
    torch.manual_seed(0)

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(6, 4), nn.Linear(6, 4)

        def forward(self, x):
            return self.q(x) * self.k(x)

    m = ftk.apply_lora(QKV(), ["q", "k"], r=2)
    for lay in (m.q, m.k):
        nn.init.normal_(lay.lora_B)
    m(torch.randn(3, 6))  # the group learns its run
    return m


def _reft_model():
    torch.manual_seed(0)
    return ftk.nn.LoReFT(6, 2)


@pytest.mark.parametrize("make", [_lora_model, _group_model, _reft_model], ids=["lora", "group", "loreft"])
def test_first_order_nodes_match_once_differentiable(make):
    model = make()
    x = torch.randn(3, 6, requires_grad=True)
    y = model(x).square().sum()
    gx, *gp = torch.autograd.grad(y, [x, *[p for p in model.parameters() if p.requires_grad]])
    # create_graph=True: first-order grads still right; a second differentiation raises, as with
    # once_differentiable (not a silently wrong second derivative)
    y2 = model(x).square().sum()
    gx2, *_ = torch.autograd.grad(y2, [x, *[p for p in model.parameters() if p.requires_grad]], create_graph=True)
    torch.testing.assert_close(gx2, gx, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match=r"differentiate twice.*plain_ops\(\)"):
        gx2.sum().backward()


def test_first_order_skips_no_grad_only_when_grad_is_off():
    seen = []

    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        @first_order
        def backward(ctx, g):
            seen.append(torch.is_grad_enabled())
            return g * 2

    x = torch.randn(4, requires_grad=True)
    F.apply(x).sum().backward()
    (g,) = torch.autograd.grad(F.apply(x).sum(), x, create_graph=True)
    assert seen == [False, False]  # under create_graph it ran inside no_grad, as once_differentiable's does
    assert torch.equal(g, torch.full_like(x, 2.0))
