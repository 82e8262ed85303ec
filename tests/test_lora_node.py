"""The C++ autograd node of fused LoRA Linear layers (csrc/autograd/lora_linear.cpp): bit-identical to
the Python autograd Functions it replaces in eager mode, gradchecked, first-order only, and the
input rebuild it shares with them."""

import pytest
import torch
from helpers.lora import lora_members
from torch import nn

import ftkernels as ftk
from ftkernels.nn.reference import lora_keep_mask
from ftkernels.ops import input_recompute as ir
from ftkernels.ops import lora_linear as ops
from ftkernels.ops.lora_group import lora_group_ys


def _run(node_on, monkeypatch, x, members, scalings, ps, use=None):
    """Outputs and grads (x, then every member tensor that needs one) with the node on or off."""
    monkeypatch.setattr(ops, "_node_on", node_on)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    ms = [tuple(None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in m) for m in members]
    ys = lora_group_ys(x, ms, scalings, ps)
    kinds = {y.grad_fn.name() for y in ys}
    torch.manual_seed(3)
    loss = sum((y.float() * torch.randn_like(y.float())).sum() for i, y in enumerate(ys) if use is None or i in use)
    loss.backward()
    leaves = [x] + [t for m in ms for t in m[:4] if t is not None]
    return ys, [t.grad for t in leaves if t.requires_grad], kinds


@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
@pytest.mark.parametrize("ps", [(0.0,), (0.3,), (0.0, 0.2, 0.0)])
@pytest.mark.parametrize(
    "dtype,adapter_dtype", [(torch.float64, None), (torch.float32, None), (torch.bfloat16, torch.float32)]
)
def test_node_equals_python_functions(lead, ps, dtype, adapter_dtype, monkeypatch):
    """Same kernels on CPU: bit-identical outputs and grads, single layers and groups, with and without
    dropout, bias or not, 2-D and N-D x, adapters of the base's dtype or fp32 on a bf16 base."""
    K, shapes = 21, [(17, 4), (6, 2), (23, 5)][: len(ps)]
    members = lora_members(K, shapes, dtype, adapter_dtype=adapter_dtype, bias=(True, False))
    x = torch.randn(*lead, 11, K, dtype=dtype, requires_grad=True)
    scalings = tuple(0.5 + i for i in range(len(ps)))
    y1, g1, k1 = _run(True, monkeypatch, x, members, scalings, ps)
    y2, g2, k2 = _run(False, monkeypatch, x, members, scalings, ps)
    assert all("LoRALinearNode" in k for k in k1) and not any("LoRALinearNode" in k for k in k2)
    for a, b in zip(y1, y2, strict=True):
        assert a.shape == (*lead, 11, b.shape[-1]) and torch.equal(a, b)
    for a, b in zip(g1, g2, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_node_unfrozen_base_and_unused_output(monkeypatch):
    """A trainable base weight and bias get g^T x and sum(g); an output never used costs nothing and
    its member gets no grads."""
    members = lora_members(13, [(9, 3), (5, 2)], torch.float64, base_grad=True)
    x = torch.randn(4, 13, dtype=torch.float64, requires_grad=True)
    y1, g1, _ = _run(True, monkeypatch, x, members, (1.0, 2.0), (0.0, 0.0), use={0})
    y2, g2, _ = _run(False, monkeypatch, x, members, (1.0, 2.0), (0.0, 0.0), use={0})
    for a, b in zip(g1, g2, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert g1[1] is not None and all(g is None for g in g1[5:])  # member 2: unused


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_node_gradcheck(p):
    """float64 gradcheck of x, every adapter and an unfrozen base through one node of two members (the
    dropout mask is a function of the seed: fixed across gradcheck's evaluations)."""
    members = lora_members(7, [(5, 2), (3, 3)], torch.float64, base_grad=True)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    assert ops.node_serves(x, (p, p))

    def f(x, w0, b0, a0, bb0, w1, a1, bb1):
        ms = [(w0, b0, a0, bb0, members[0][4]), (w1, None, a1, bb1, members[1][4])]
        return lora_group_ys(x, ms, (0.7, 1.3), (p, p))

    m0, m1 = members
    assert torch.autograd.gradcheck(f, (x, *m0[:4], m1[0], *m1[2:4]))


def test_node_is_first_order():
    """create_graph=True gives the first-order grads; differentiating them again raises (as Python's
    once_differentiable), never a silent zero."""
    layer = ftk.nn.LoRALinear(nn.Linear(8, 6).double(), r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert "LoRALinearNode" in y.grad_fn.name()
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (ref,) = torch.autograd.grad(layer(x).square().sum(), x)
    assert gx.requires_grad and torch.equal(gx.detach(), ref)
    with pytest.raises(RuntimeError, match=r"differentiate twice.*plain_ops\(\)"):
        gx.sum().backward()


def test_node_under_cpu_autocast(monkeypatch):
    """Autocast bf16 on CPU: the layer casts to bf16 before the node, whose GEMMs then run in bf16 with
    autocast off inside (as the Python Function): the same bits either way."""
    torch.manual_seed(5)
    layer = ftk.nn.LoRALinear(nn.Linear(24, 16), r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 7, 24)
    outs = []
    for on in (True, False):
        monkeypatch.setattr(ops, "_node_on", on)
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
        outs.append((y, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    assert outs[0][0].dtype == torch.bfloat16
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_rebuild_program_is_validated():
    """The extension's rebuild evaluator refuses a malformed program or a tensor index out of range."""
    C = ftk._ext.C()
    t = torch.randn(3)
    assert torch.equal(C.rebuild_input([0, 0, 2], [t]), torch.nn.functional.silu(t))
    for bad in ([0, 1], [3], [0, 0, 0, 0], [9], [0]):
        with pytest.raises(RuntimeError, match="rebuild_input"):
            C.rebuild_input(bad, [t])


def test_program_encodes_every_plan_node():
    """Plans from LayerNorm (with and without affine), GELU (both approximations), SiLU * x and a cast
    rebuild their x bit-identically (LayerNorm within its ulp) through the encoded program."""
    h = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    cases = [
        nn.functional.layer_norm(h, (12,), w, torch.randn(12, dtype=torch.float64)),
        nn.functional.layer_norm(h, (12,)),
        nn.functional.gelu(h, approximate="tanh"),
        nn.functional.gelu(h),
        nn.functional.silu(h) * (h * 2),
        (nn.functional.silu(h) * w).to(torch.float32),
    ]
    for x in cases:
        p = ir.plan(x)
        assert p is not None, x.grad_fn
        got = ir.rebuild(p)
        assert got.dtype == x.dtype and got.shape == x.shape
        torch.testing.assert_close(got, x.detach(), rtol=0, atol=4 * torch.finfo(x.dtype).eps * x.abs().max().item())


def _node_run(x, members, scalings, ps, dense_cpu):
    """Outputs and grads (x, then each member's A and B) of one node call on fresh leaf copies."""
    x = x.detach().clone().requires_grad_()
    ms = [tuple(None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in m) for m in members]
    ys = ops.node_ys(x, ms, scalings, ps, dense_cpu)
    torch.manual_seed(3)
    sum((y.float() * torch.randn_like(y.float())).sum() for y in ys).backward()
    return [*ys, x.grad, *(t.grad for m in ms for t in m[2:4])]


@pytest.mark.parametrize("lead", [(), (2, 3)])
@pytest.mark.parametrize("ps", [(0.3,), (0.2, 0.0, 0.5)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_gemm_route_equals_cpu_kernels(lead, ps, dtype, tol):
    """The GEMM route CUDA calls take (ATen GEMMs around the mask kernel), run on CPU, against the CPU
    kernels: the same mask and the same sums up to rounding, dropout on and off, groups included."""
    K, shapes = 29, [(17, 4), (6, 2), (23, 5)][: len(ps)]
    members = lora_members(K, shapes, dtype, bias=(True, False))
    x = torch.randn(*lead, 13, K, dtype=dtype)
    scalings = tuple(0.5 + i for i in range(len(ps)))
    fused = _node_run(x, members, scalings, ps, dense_cpu=False)
    gemm = _node_run(x, members, scalings, ps, dense_cpu=True)
    for a, b in zip(gemm, fused, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def test_gemm_route_gradcheck():
    """float64 gradcheck of the GEMM route with dropout (x, both members' adapters)."""
    members = lora_members(9, [(5, 2), (4, 3)], torch.float64)

    def f(x, a0, b0, a1, b1):
        ms = [(members[0][0], members[0][1], a0, b0, members[0][4]), (members[1][0], None, a1, b1, members[1][4])]
        return ops.node_ys(x, ms, (0.7, 1.3), (0.4, 0.25), True)

    x = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, *members[0][2:4], *members[1][2:4]))


def _mask_reference(src, seed, p, scale, acc=None):
    """keep ? src * scale : 0 (plus acc) in the kernels' opmath dtype, from the reference mask."""
    op = torch.float64 if src.dtype == torch.float64 else torch.float32
    keep = lora_keep_mask(seed, src.shape[0], src.shape[1], p).to(src.device)
    v = torch.where(keep, src.to(op) * torch.tensor(scale, dtype=op, device=src.device), 0)
    return (v if acc is None else acc.to(op) + v).to(src.dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 13, 64])
def test_mask_apply_is_the_dropout_stream(dtype, K):
    """lora_mask_apply: the LoRA stream's mask (the reference mask, and the same bits as lora_dropout
    with scale 1/(1-p)), copied or added into an accumulator in place."""
    C, p, seed = ftk._ext.C(), 0.3, torch.tensor(987654321987)
    x = torch.randn(37, K).to(dtype)
    got = C.lora_mask_apply(x, seed, p, 1 / (1 - p))
    assert torch.equal(got, C.lora_dropout_cpu(x, p, int(seed)))
    assert torch.equal(got, _mask_reference(x, seed, p, 1 / (1 - p)))
    assert torch.equal(C.lora_mask_apply(x, seed, p, 1.0), _mask_reference(x, seed, p, 1.0))
    acc = torch.randn(37, K).to(dtype)
    want = _mask_reference(x, seed, p, 2.5, acc)
    out = C.lora_mask_apply(x, seed, p, 2.5, acc)
    assert out.data_ptr() == acc.data_ptr() and torch.equal(acc, want)
    view = torch.randn(K, 37).to(dtype).t()  # a non-contiguous src is read through a copy
    assert torch.equal(C.lora_mask_apply(view, seed, p, 1.0), _mask_reference(view.contiguous(), seed, p, 1.0))


def test_mask_apply_rejects_bad_input():
    C, x, seed = ftk._ext.C(), torch.randn(4, 6), torch.tensor(5)
    cases = [
        ((torch.randn(2, 3, 4), seed, 0.1, 1.0, None), "2-D"),
        ((x, seed.double(), 0.1, 1.0, None), "int64"),
        ((x, torch.tensor([1, 2]), 0.1, 1.0, None), "int64"),
        ((x, seed, 1.0, 1.0, None), r"\[0, 1\)"),
        ((x, seed, 0.1, 1.0, torch.randn(4, 5)), "acc"),
        ((x, seed, 0.1, 1.0, torch.randn(6, 4).t()), "acc"),
        ((x, seed, 0.1, 1.0, torch.randn(4, 6, dtype=torch.float64)), "acc"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            C.lora_mask_apply(*args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K", [13, 64, 200])
def test_cuda_mask_apply_equals_cpu(dtype, K):
    """The CUDA mask kernel gives the CPU kernel's bits: copy and accumulate, vector rows (K % 8 == 0,
    aligned) and element-wise ones (odd K, or a src 1 element off alignment)."""
    C, p = ftk._ext.C(), 0.1
    seed = torch.tensor(123456789123)
    flat = torch.randn(45 * K + 1, device="cuda").to(dtype)
    accs = torch.randn(45 * K + 1, device="cuda").to(dtype)
    for off in (0, 1):  # offset 1: the device tensors sit off the 8-element alignment
        x, acc = flat[off : off + 45 * K].view(45, K), accs[off : off + 45 * K].view(45, K)
        for scale, a in ((1.0, None), (1 / (1 - p), None), (1 / (1 - p), acc)):
            want = C.lora_mask_apply(x.cpu(), seed, p, scale, None if a is None else a.cpu())
            got = C.lora_mask_apply(x, seed.cuda(), p, scale, a)  # into acc itself, when given
            assert torch.equal(got.cpu(), want)


@pytest.mark.cuda
def test_cuda_dropout_routes_with_graphs():
    """Eager CUDA calls with dropout take the node; inside graph_routing (GraphedTrainStep's warm-up and
    capture) the Triton route. A user's own capture outside it gets the node: warmed up, captured and
    replayed, it gives the eager result for the same seed."""
    x = torch.randn(4, 8, device="cuda")
    assert ops.node_serves(x, (0.1,))
    with ops.graph_routing():
        assert not ops.node_serves(x, (0.1,)) and ops.node_serves(x, (0.0,))
    base = nn.Linear(64, 48).cuda()
    a = torch.randn(4, 64, device="cuda", requires_grad=True)
    b = torch.randn(48, 4, device="cuda", requires_grad=True)
    xs, seed = torch.randn(16, 64, device="cuda", requires_grad=True), torch.tensor(77, device="cuda")

    def step():
        y = ftk.nn.lora_linear(xs, base.weight, base.bias, a, b, 0.5, 0.2, seed=seed)
        return (y, *torch.autograd.grad(y.square().sum(), (xs, a, b)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    assert "LoRALinearNode" in captured[0].grad_fn.name()
    graph.replay()
    for got, want in zip(captured, step(), strict=True):  # cuBLAS may pick other kernels on the capture stream
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)])
def test_cuda_node_against_python_route(dropout, dtype, adapter_dtype, monkeypatch):
    """On CUDA, single layers and groups. Dropout-free, the node makes the Python route's cuBLAS calls:
    bit-identical outputs and grads. With dropout, its GEMM route (cuBLAS and the mask kernel) against
    the Python route's Triton kernels: the same mask, so the same results up to the GEMMs' rounding."""
    K, shapes = 96, [(80, 8), (32, 4), (80, 8)]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for ps in [(0.1,), (0.1, 0.0, 0.3)] if dropout else [(0.0,), (0.0, 0.0, 0.0)]:
        members = lora_members(K, shapes[: len(ps)], dtype, "cuda", adapter_dtype, bias=(True, False))
        x = torch.randn(3, 40, K, dtype=dtype, device="cuda", requires_grad=True)
        scal = tuple(1.0 + i for i in range(len(ps)))
        y1, g1, k1 = _run(True, monkeypatch, x, members, scal, ps)
        y2, g2, k2 = _run(False, monkeypatch, x, members, scal, ps)
        assert all("LoRALinearNode" in k for k in k1) and not any("LoRALinearNode" in k for k in k2)
        for a, b in zip(y1 + g1, y2 + g2, strict=True):
            if dropout:
                torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item())
            else:
                assert torch.equal(a, b)
