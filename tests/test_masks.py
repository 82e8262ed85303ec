"""Mask packing and the mask builders of ftkernels.masks."""

import pytest
import torch
from torch import nn

import ftkernels as ftk
from ftkernels import masks


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1023])
def test_pack_unpack_round_trip(n):
    m = torch.rand(n) > 0.5
    bits = masks.pack_bits(m)
    assert bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8
    assert torch.equal(masks.unpack_bits(bits, n), m)


def test_random_exact_count_and_seeded():
    p = torch.randn(37, 11)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = masks.random(p, 0.25, generator=g1), masks.random(p, 0.25, generator=g2)
    assert a.shape == p.shape and a.dtype == torch.bool
    assert int(a.sum()) == round(0.25 * p.numel())
    assert torch.equal(a, b)
    assert int(masks.random(p, 1e-9).sum()) == 1  # never empty


def test_magnitude_keeps_largest():
    p = torch.randn(50, 20)
    m = masks.magnitude(p, 0.1)
    k = round(0.1 * p.numel())
    assert int(m.sum()) == k
    assert p.abs()[m].min() >= p.abs()[~m].max()


def test_rows_by_indices_fraction_and_conv():
    p = torch.randn(6, 4)
    m = masks.rows(p, indices=[0, 5])
    assert torch.equal(m.any(dim=1), torch.tensor([True, False, False, False, False, True]))
    assert torch.equal(m.all(dim=1), m.any(dim=1))  # whole rows
    w = torch.randn(8, 3, 3, 3)
    w[2] *= 100
    mc = masks.rows(w, keep=0.125)  # one output channel: the largest
    assert mc.shape == w.shape and bool(mc[2].all()) and int(mc.sum()) == 27
    r = masks.rows(w, keep=0.5, by="random", generator=torch.Generator().manual_seed(0))
    assert int(r.reshape(8, -1).all(dim=1).sum()) == 4


def test_blocks_structure_and_magnitude():
    p = torch.randn(40, 33) * 0.01
    p[16:32, 0:16] = 5.0  # one hot tile
    m = masks.blocks(p, keep=1 / 9, block=16)  # 3 x 3 tiles (edge tiles partial): keep 1
    assert m.shape == p.shape
    assert bool(m[16:32, 0:16].all()) and int(m.sum()) == 256
    r = masks.blocks(p, keep=0.5, block=8, by="random", generator=torch.Generator().manual_seed(1))
    tiles = r[:40, :32].reshape(5, 8, 4, 8)
    assert torch.equal(tiles.all(dim=(1, 3)), tiles.any(dim=(1, 3)))  # tiles are all-or-nothing


def test_fisher_topk_global_and_per_layer():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    fisher = ftk.fisher_diagonal(model, batches)
    total = sum(p.numel() for p in model.parameters())
    g = masks.fisher_topk(model, batches, keep=0.2)
    assert sum(int(m.sum()) for m in g.values()) == round(0.2 * total)
    kept = torch.cat([fisher[p][m] for p, m in g.items()])
    dropped = torch.cat([fisher[p][~m] for p, m in g.items()])
    assert kept.min() >= dropped.max()
    per = masks.fisher_topk(model, batches, keep=0.2, per_layer=True)
    for p, m in per.items():
        assert int(m.sum()) == max(1, round(0.2 * p.numel()))


def test_builders_feed_the_optimizer():
    lin = torch.nn.Linear(16, 8)
    ftk.set_grad_mask(lin.weight, masks.rows(lin.weight, indices=[1, 3]))
    w0 = lin.weight.detach().clone()
    opt = ftk.optim.FusedAdamW([lin.weight], lr=0.1)
    lin.weight.grad = torch.randn_like(lin.weight)
    opt.step()
    changed = (lin.weight != w0).any(dim=1)
    assert changed.tolist() == [False, True, False, True, False, False, False, False]


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, True, "0.5"])
def test_bad_keep(keep):
    with pytest.raises(ValueError, match="keep"):
        masks.random(torch.randn(4), keep)


def test_bad_builder_input():
    with pytest.raises(ValueError, match="exactly one"):
        masks.rows(torch.randn(3, 3))
    with pytest.raises(ValueError, match="out of range"):
        masks.rows(torch.randn(3, 3), indices=[3])
    with pytest.raises(ValueError, match="2-D"):
        masks.blocks(torch.randn(3, 3, 3), keep=0.5)
    with pytest.raises(ValueError, match="by must be"):
        masks.blocks(torch.randn(3, 3), keep=0.5, by="size")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_builders_refuse_non_finite_scores(bad):
    # topk ranks NaN above everything: a NaN weight would be "kept" for its magnitude
    w = torch.randn(8, 8)
    w[3, 5] = bad
    for build in (
        lambda: masks.magnitude(w, 0.5),
        lambda: masks.rows(w, keep=0.5),
        lambda: masks.blocks(w, keep=0.5, block=4),
    ):
        with pytest.raises(ValueError, match="1 non-finite"):
            build()
    assert masks.rows(w, keep=0.5, by="random").shape == w.shape  # random scores ignore the values
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight[0, 0] = 0.0  # sqrt(|w|) there: a finite loss whose gradient is NaN
    loss = lambda m, b: m.weight[0, 0].abs().sqrt() + m(b).square().mean()  # noqa: E731
    for per_layer in (False, True):
        with pytest.raises(ValueError, match="fisher_topk: the Fisher.* 1 non-finite"):
            masks.fisher_topk(model, [torch.randn(3, 4)], loss, keep=0.5, per_layer=per_layer)


def test_an_optimizer_that_ignores_masks_warns_once():
    """torch.optim's optimizers step masked parameters as unmasked (weight decay moves the masked-out
    elements): a warning, once per optimizer and mask set-up; none from the fused optimizers or from a
    wrapper around one (Accelerate's AcceleratedOptimizer, or one holding it in ``.optimizer``)."""
    import warnings

    from accelerate import Accelerator

    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    mask = torch.rand(5, 6) > 0.5
    ftk.set_grad_mask(lin.weight, mask)

    def steps(opt, n=3):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(n):
                opt.zero_grad()
                lin(torch.randn(4, 6)).square().sum().backward()
                opt.step()
        return [str(w.message) for w in seen if "gradient mask" in str(w.message)]

    before = lin.weight.detach().clone()
    said = steps(torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=0.1))
    assert len(said) == 1 and "AdamW steps 1 parameter(s)" in said[0] and "(5, 6)" in said[0]
    assert not torch.equal(lin.weight[~mask], before[~mask])  # what the warning is about
    frozen = lin.weight.detach().clone()
    assert steps(ftk.optim.FusedAdamW(lin.parameters(), lr=1e-2, weight_decay=0.1)) == []
    assert torch.equal(lin.weight[~mask], frozen[~mask])
    assert steps(Accelerator(cpu=True).prepare_optimizer(ftk.optim.FusedAdamW(lin.parameters()))) == []

    class Wrapper(torch.optim.Optimizer):  # a wrapper that is an Optimizer itself, so the hooks see it
        def __init__(self, inner):
            super().__init__([p for g in inner.param_groups for p in g["params"]], {})
            self.optimizer = inner

        def step(self, closure=None):
            return self.optimizer.step(closure)

    assert steps(Wrapper(ftk.optim.FusedAdamW(lin.parameters()))) == []
    assert len(steps(Wrapper(torch.optim.AdamW(lin.parameters())))) == 1
    ftk.set_grad_mask(lin.weight, None)
    assert steps(torch.optim.SGD(lin.parameters(), lr=1e-2)) == []
