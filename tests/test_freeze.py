"""Layer-level freezing: patterns, summary, and that frozen layers cost no gradients."""

import re

import pytest
import torch
from torch import nn

import ftkernels as ftk


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def test_trainable_head_only_and_summary(capsys):
    net = small_net()
    s = ftk.freeze(net, trainable=["4.*"])
    assert [p.requires_grad for p in net.parameters()] == [False] * 6 + [True] * 2
    assert s.trainable == 16 * 3 + 3 and s.total == sum(p.numel() for p in net.parameters())
    assert s.blocks[-1] == ("4", 51, 51) and s.blocks[0] == ("0", 0, 8 * 16 + 16)
    out = capsys.readouterr().out
    assert "all" in out and "%" in out


def test_type_regex_and_frozen_on_top():
    net = small_net()
    ftk.freeze(net, trainable=[nn.LayerNorm, re.compile(r"^4\.")], verbose=False)
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    assert names == {"2.1.weight", "2.1.bias", "4.weight", "4.bias"}
    ftk.freeze(net, frozen=["*.bias"], verbose=False)
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    assert names == {"2.1.weight", "4.weight"}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # block 2's input needs no grad: intended
def test_frozen_layers_compute_no_input_grad_and_allocate_no_grad():
    net = small_net()
    for p in net.parameters():
        p.grad = torch.ones_like(p)  # stale grads are dropped on freeze
    ftk.freeze(net, trainable=["2.*", "4.*"], verbose=False)
    calls = {}
    for name in ("0", "2", "4"):
        net.get_submodule(name).register_full_backward_hook(lambda m, gi, go, n=name: calls.__setitem__(n, 1))
    net(torch.randn(5, 8)).sum().backward()
    assert calls == {"2": 1, "4": 1}  # nothing below the lowest trainable layer
    assert net[0].weight.grad is None and net[0].bias.grad is None
    assert net[4].weight.grad is not None


def test_bad_patterns():
    net = small_net()
    with pytest.raises(ValueError, match="classifier"):
        ftk.freeze(net, trainable=["classifier.*"])
    with pytest.raises(ValueError, match="Conv2d"):
        ftk.freeze(net, frozen=[nn.Conv2d])
    with pytest.raises(ValueError, match="give trainable"):
        ftk.freeze(net)
    with pytest.raises(TypeError, match="patterns"):
        ftk.freeze(net, trainable=[3])
