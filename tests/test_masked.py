"""MaskedLinear / MaskedConv2d: weight gradients equal the dense gradient times the mask (computed
only over the kept rows, channels or tiles), exact grad_x, and masked training that leaves frozen
elements bit-identical while kept ones follow the plain-PyTorch reference."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ftkernels as ftk
from ftkernels.nn.masked import _gather_index, _plan
from ftkernels.optim.reference import ReferenceOptimizer


def _masks(w):
    return {
        "rows": ftk.masks.rows(w, keep=0.3, by="random"),
        "blocks16": ftk.masks.blocks(w, keep=0.3, block=16, by="random"),
        "blocks32": ftk.masks.blocks(w, keep=0.3, block=32, by="random"),
        "elements": ftk.masks.random(w, keep=0.3),
    }


@pytest.mark.parametrize("kind", ["rows", "blocks16", "blocks32", "elements"])
def test_masked_linear_grads(kind):
    torch.manual_seed(0)
    lin = nn.Linear(70, 45, dtype=torch.float64)
    mask = _masks(lin.weight)[kind]
    want_kind = {"rows": "rows", "blocks16": "blocks", "blocks32": "blocks", "elements": "elements"}[kind]
    m = ftk.nn.MaskedLinear.from_linear(nn.Linear(70, 45, dtype=torch.float64), mask)
    m.load_state_dict(lin.state_dict())
    assert m.plan["kind"] == want_kind
    x = torch.randn(3, 5, 70, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = m(x), lin(x2)
    torch.testing.assert_close(y, y2)
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, m.weight, m.bias), g)
    gx2, gw2, gb2 = torch.autograd.grad(y2, (x2, lin.weight, lin.bias), g)
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gw, gw2 * mask)
    torch.testing.assert_close(gb, gb2 * mask.any(1))
    # grad_x is the exact gradient (grad_W is masked by design: compared with the dense one above)
    w = m.weight.detach()
    assert torch.autograd.gradcheck(lambda x: ftk.nn.masked._MaskedLinearFn.apply(x, w, None, m.plan), (x,))


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 410])
def test_gather_index_pads_to_eight_with_the_last_row(n):
    rows = torch.randperm(4096)[:n].sort().values
    idx = _gather_index(rows)
    assert idx.numel() % 8 == 0 and idx.numel() - n < 8
    torch.testing.assert_close(idx[:n], rows, rtol=0, atol=0)
    assert n == 0 or (idx[n:] == rows[-1]).all()


@pytest.mark.parametrize("kind", ["rows", "elements"])
def test_masked_conv2d_grads(kind):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 12, 3, stride=2, padding=1, dtype=torch.float64)
    mask = ftk.masks.rows(conv.weight, keep=0.25, by="random") if kind == "rows" else ftk.masks.random(conv.weight, 0.3)
    m = ftk.nn.MaskedConv2d(5, 12, 3, stride=2, padding=1, dtype=torch.float64)
    m.load_state_dict(conv.state_dict())
    m.set_mask(mask)
    assert m.plan["kind"] == kind
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = m(x), conv(x2)
    torch.testing.assert_close(y, y2)
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, m.weight, m.bias), g)
    gx2, gw2, gb2 = torch.autograd.grad(y2, (x2, conv.weight, conv.bias), g)
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gw, gw2 * mask)
    torch.testing.assert_close(gb, gb2 * mask.flatten(1).any(1))
    w, b = m.weight.detach(), m.bias.detach()
    geom = ([2, 2], [1, 1], [1, 1], 1)
    assert torch.autograd.gradcheck(lambda x: ftk.nn.masked._MaskedConvFn.apply(x, w, b, m.plan, geom), (x,))


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_all_frozen_rows_give_zero_weight_and_bias_grads(layer):
    """An all-False mask is a rows plan with no rows: zero weight and bias gradients, exact grad_x."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5, dtype=torch.float64) if layer == "linear" else nn.Conv2d(3, 4, 3, dtype=torch.float64)
    mask = torch.zeros_like(base.weight, dtype=torch.bool)
    m = (ftk.nn.MaskedLinear.from_linear if layer == "linear" else ftk.nn.MaskedConv2d.from_conv)(base, mask)
    assert m.plan["kind"] == "rows" and m.plan["rows"].numel() == 0
    x = torch.randn(2, 6, dtype=torch.float64) if layer == "linear" else torch.randn(2, 3, 7, 6, dtype=torch.float64)
    x.requires_grad_(True)
    y = m(x)
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, m.weight, m.bias), g)
    x2 = x.detach().requires_grad_(True)
    (gx2,) = torch.autograd.grad(base(x2), (x2,), g)
    torch.testing.assert_close(gx, gx2)
    assert torch.all(gw == 0) and torch.all(gb == 0)


def test_from_conv_shares_the_parameters():
    conv = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
    mask = ftk.masks.rows(conv.weight, indices=[1, 4])
    m = ftk.nn.MaskedConv2d.from_conv(conv, mask)
    assert m.weight is conv.weight and m.bias is conv.bias and m.plan["kind"] == "rows"
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(m(x), conv(x))
    (gw,) = torch.autograd.grad(m(x).sum(), (m.weight,))
    (gw2,) = torch.autograd.grad(conv(x).sum(), (conv.weight,))
    torch.testing.assert_close(gw, gw2 * mask)


def test_masked_training_freezes_exactly_and_matches_reference():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 4))
    ref_net = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 4))
    ref_net.load_state_dict(net.state_dict())
    net[0] = ftk.nn.MaskedLinear.from_linear(net[0], ftk.masks.rows(net[0].weight, keep=0.1, by="random"))
    net[2] = ftk.nn.MaskedLinear.from_linear(net[2], ftk.masks.blocks(net[2].weight, keep=0.25, block=16))
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    for (_, p), (_, q) in zip(net.named_parameters(), ref_net.named_parameters(), strict=True):
        mask = ftk.get_grad_mask(p)
        if mask is not None:
            ftk.set_grad_mask(q, mask)
    opt = ftk.optim.FusedAdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}  # every option, defaults included
    ref = ReferenceOptimizer("adamw", list(ref_net.parameters()), **group)
    x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
    for _ in range(20):
        for model, o in ((net, opt), (ref_net, ref)):
            for p in model.parameters():
                p.grad = None
            F.cross_entropy(model(x), y).backward()
            o.step()
    for (n, p), q in zip(net.named_parameters(), ref_net.parameters(), strict=True):
        mask = ftk.get_grad_mask(p)
        if mask is not None:
            assert torch.equal(p.detach()[~mask], start[n][~mask])  # bit-identical
            assert not torch.equal(p.detach()[mask], start[n][mask])
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)


def test_bad_masks():
    lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="shape"):
        ftk.nn.MaskedLinear.from_linear(lin, torch.ones(4, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        ftk.nn.MaskedLinear.from_linear(lin, torch.ones(4, 8))
    with pytest.raises(ValueError, match="keep"):
        ftk.masks.rows(lin.weight, keep=1.5)
    with pytest.raises(TypeError, match="nn.Linear"):
        ftk.nn.MaskedLinear.from_linear(nn.Conv2d(1, 1, 1), torch.ones(1, 1, 1, 1, dtype=torch.bool))


def test_plan_detects_structure():
    w = torch.empty(40, 50)
    assert _plan(torch.zeros(40, 50, dtype=torch.bool))["kind"] == "rows"
    assert _plan(ftk.masks.blocks(w, keep=0.5, block=16, by="random"))["kind"] == "blocks"


def _rows_case(dev, dtype, M, N, K, keep):
    """A random rows plan (int64 rows as ``_plan`` makes them) and non-contiguous g [M, N], x [M, K]."""
    kept = torch.rand(N) < keep
    plan = _plan(kept[:, None].expand(N, K).contiguous().to(dev))
    g = torch.randn(N, M, device=dev).to(dtype).t()  # non-contiguous [M, N]
    x = torch.randn(K, M, device=dev).to(dtype).t()
    return plan, kept.to(dev), g, x


_ROW_CASES = [(70, 45, 33, 0.2), (33, 100, 64, 0.1), (16, 8, 5, 1.0), (9, 12, 7, 0.0), (130, 70, 90, 0.5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("M", "N", "K", "keep"), _ROW_CASES)
def test_triton_gather_t_and_fill_rows(dtype, M, N, K, keep):
    """gather_t is g[:, rows]^T exactly; fill_rows puts each kept row's values at its index and exact
    zeros elsewhere (interpreter on CPU, the GPU when present)."""
    from ftkernels.triton.masked import fill_rows, gather_t

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    plan, kept, g, _ = _rows_case(dev, dtype, M, N, K, keep)
    rows = plan["rows"]
    gt = gather_t(g, rows)
    assert gt.shape == (rows.numel(), M) and gt.is_contiguous()
    assert torch.equal(gt, g[:, rows].t())
    res = torch.randn(K, rows.numel(), device=dev).to(dtype).t()  # any strides
    out = fill_rows(res, plan["inv"], (N, K), dtype)
    assert out.dtype == dtype and torch.equal(out[rows], res) and torch.all(out[~kept] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("M", "N", "K", "keep"), _ROW_CASES)
def test_triton_rows_gemm(monkeypatch, dtype, M, N, K, keep):
    """The fused GEMM: the kept rows equal g^T x (float64 reference), every other row exactly zero,
    whether the zeroing programs come after an idle-SM tail or as a full wave."""
    from ftkernels.triton import masked
    from ftkernels.triton.masked import gather_t, rows_gemm, zero_programs

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    plan, kept, g, x = _rows_case(dev, dtype, M, N, K, keep)
    gt = gather_t(g, plan["rows"])
    rows_gemm(gt, x, plan["rows"], plan["zrows"], (N, K))  # autotuning (GPU) happens outside the patch
    real_empty = torch.empty

    def nan_empty(*a, **k):  # float outputs start as NaN: an element no program writes cannot pass for 0
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(masked.torch, "empty", nan_empty)
    out = rows_gemm(gt, x, plan["rows"], plan["zrows"], (N, K))
    monkeypatch.undo()
    want = g.double().t() @ x.double()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out[kept].double(), want[kept], atol=tol * M, rtol=tol)
    assert torch.all(out[~kept] == 0) and out.dtype == dtype
    assert zero_programs(112, 0, 132) == 0 and zero_programs(112, 5, 132) == 20 and zero_programs(130, 5, 132) == 132


def test_triton_kernels_reject_bad_indices():
    from ftkernels.triton.masked import gather_t

    with pytest.raises(TypeError, match="int32/int64"):
        gather_t(torch.randn(4, 5), torch.tensor([0.0, 2.0]))


@pytest.mark.parametrize("bias", [True, False])
def test_masked_linear_routes_agree(monkeypatch, bias):
    """Every rows-mode route gives the same weight and bias gradients (forced one at a time; on CPU
    the op always takes ``torch``, so there the Triton routes are run directly)."""
    from ftkernels.nn.masked import _ROWS

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)
    plan, kept, g, x = _rows_case(dev, torch.float32, 77, 50, 40, 0.3)
    want = (g.double().t() @ x.double()) * kept[:, None]
    for name, route in _ROWS.items():
        gw, compact, dim = route(g, x, plan, (50, 40))
        torch.testing.assert_close(gw.double(), want, atol=1e-4, rtol=1e-5, msg=name)
        bsum = torch.zeros(50, dtype=torch.float64, device=dev)
        bsum[plan["rows"]] = compact.double().sum(dim)[: plan["rows"].numel()]
        torch.testing.assert_close(bsum, g.double().sum(0) * kept, atol=1e-4, rtol=1e-5, msg=name)
    lin = nn.Linear(40, 50, bias=bias, device=dev)
    mask = kept[:, None].expand(50, 40).contiguous()
    for name in _ROWS if dev == "cuda" else ["torch"]:
        monkeypatch.setenv("FTKERNELS_MASKED_WGRAD", name)
        m = ftk.nn.MaskedLinear.from_linear(lin, mask)
        m.weight.grad = None
        if bias:
            m.bias.grad = None
        m(x).backward(g)
        torch.testing.assert_close(m.weight.grad.double(), want, atol=1e-4, rtol=1e-5)
        if bias:
            torch.testing.assert_close(m.bias.grad.double(), g.double().sum(0) * kept, atol=1e-4, rtol=1e-5)


@pytest.mark.cuda
def test_masked_linear_bf16_routes_match_torch_route(monkeypatch):
    lin = nn.Linear(256, 192, device="cuda", dtype=torch.bfloat16)
    mask = ftk.masks.rows(lin.weight, keep=0.1, by="random")
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(300, 192, device="cuda", dtype=torch.bfloat16)
    grads = {}
    for route in ("torch", "split", "fused"):
        monkeypatch.setenv("FTKERNELS_MASKED_WGRAD", route)
        m = ftk.nn.MaskedLinear.from_linear(lin, mask)
        m.weight.grad = m.bias.grad = None
        m(x).backward(g)
        grads[route] = (m.weight.grad.float(), m.bias.grad.float())
    for route in ("split", "fused"):
        for got, want in zip(grads[route], grads["torch"], strict=True):
            torch.testing.assert_close(got, want, atol=0.05, rtol=2e-2)


@pytest.mark.cuda
def test_masked_linear_fp64_on_cuda_takes_aten_whatever_the_setting(monkeypatch):
    """The Triton GEMM serves fp16/bf16/fp32 only: fp64 runs the ATen route even when ``fused`` is forced."""
    monkeypatch.setenv("FTKERNELS_MASKED_WGRAD", "fused")
    lin = nn.Linear(40, 30, device="cuda", dtype=torch.float64)
    mask = ftk.masks.rows(lin.weight, keep=0.3, by="random")
    m = ftk.nn.MaskedLinear.from_linear(lin, mask)
    x = torch.randn(20, 40, device="cuda", dtype=torch.float64)
    g = torch.randn(20, 30, device="cuda", dtype=torch.float64)
    m(x).backward(g)
    torch.testing.assert_close(m.weight.grad, (g.t() @ x) * mask)


def test_route_settings(monkeypatch):
    """The per-shape route helper behind FTKERNELS_MASKED_WGRAD / FTKERNELS_LORA_GEMM: a bad setting
    is named, a forced one is taken as is, and ``auto`` falls back to the safe route without a GPU
    to time on (and caches nothing)."""
    from ftkernels.nn.masked import ROWS_WGRAD_ROUTE as route

    monkeypatch.setenv("FTKERNELS_MASKED_WGRAD", "fastest")
    with pytest.raises(ValueError, match="MASKED_WGRAD must be one of auto, fused, split, torch; got .fastest."):
        route.setting()
    monkeypatch.setenv("FTKERNELS_MASKED_WGRAD", "fused")
    assert route.pick(("k",), {"fused": lambda: None, "torch": lambda: None}) == "fused"
    if not torch.cuda.is_available():
        monkeypatch.delenv("FTKERNELS_MASKED_WGRAD")
        assert route.pick(("k",), {"fused": lambda: None, "torch": lambda: None}) == "torch"
        assert route.chosen() == {}


def test_from_linear_and_from_conv_refuse_bases_with_their_own_forward():
    """The masked layers compute the output from the weight: a subclass's own forward would be lost."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.5

    class Padded(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(F.pad(x, (1, 1, 1, 1)), weight, bias)

    with pytest.raises(TypeError, match="Scaled overrides Linear.forward"):
        ftk.nn.MaskedLinear.from_linear(Scaled(4, 3), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="Padded overrides Conv2d._conv_forward"):
        ftk.nn.MaskedConv2d.from_conv(Padded(2, 3, 3), torch.ones(3, 2, 3, 3, dtype=torch.bool))


def test_masked_linear_output_takes_in_place_ops():
    """A [B, T, N] output of MaskedLinear is no view made inside its Function, so ``h += r`` works, and
    the grads are the dense layer's times the mask (grad_x exact)."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    mask = ftk.masks.rows(lin.weight, keep=0.5, by="random")
    masked = ftk.nn.MaskedLinear.from_linear(copy.deepcopy(lin), mask)
    x = torch.randn(2, 5, 8, requires_grad=True)
    r = torch.randn(2, 5, 6)
    y = masked(x)
    y += r
    y.relu_()
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, masked.weight), g)
    rx, rw = torch.autograd.grad(torch.relu(lin(x) + r), (x, lin.weight), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw * mask)


def test_bert_with_every_kind_of_freezing_resumes_bit_exact():
    """One model with layer freezing (``freeze``), a rows-masked MaskedLinear, an element mask kept in
    compact optimizer state, L2-SP, L1 and clipping: saving model and optimizer after 3 steps and
    resuming in a rebuilt model ends bit-identical to 6 uninterrupted steps. (Gradient dropout turns
    compact state off; its own resume is tested with the optimizers.)"""
    import io

    from transformers import BertConfig, BertForSequenceClassification

    def build():
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                         vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
        m = BertForSequenceClassification(cfg)
        ftk.freeze(m, trainable=["classifier", "bert.encoder.layer.2.*", "bert.encoder.layer.1.*"], verbose=False)
        ffn = m.bert.encoder.layer[2].intermediate
        rows = ftk.masks.rows(ffn.dense.weight, keep=0.25, by="random", generator=torch.Generator().manual_seed(1))
        ffn.dense = ftk.nn.MaskedLinear.from_linear(ffn.dense, rows)
        w = m.bert.encoder.layer[1].output.dense.weight
        ftk.set_grad_mask(w, ftk.masks.random(w, 0.1, generator=torch.Generator().manual_seed(2)))
        params = [p for p in m.parameters() if p.requires_grad]
        return m, ftk.optim.FusedAdamW(params, lr=1e-2, l2sp=1e-3, l1=1e-5, max_grad_norm=1.0)

    ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 1, 0])

    def step(m, opt, i):
        opt.zero_grad()
        m(input_ids=ids, labels=labels).loss.backward()
        opt.step()

    straight, opt = build()
    for i in range(6):
        step(straight, opt, i)
    assert any(v.numel() < p.numel() for p, st in opt.state.items() for k, v in st.items() if k == "exp_avg")
    first, opt = build()
    for i in range(3):
        step(first, opt, i)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    resumed, opt = build()
    saved = torch.load(buf, weights_only=False)
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    for i in range(3, 6):
        step(resumed, opt, i)
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), n
