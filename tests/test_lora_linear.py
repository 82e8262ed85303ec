"""Fused LoRA Linear: against PEFT's lora.Linear and the plain-PyTorch reference, gradcheck, the
dropout stream (same on CPU C++, Triton and the NumPy oracle), saved tensors, custom-op checks."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.lora import FixedMaskDropout, lora_nodes
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLinear
from torch import nn

import ftkernels as ftk
from ftkernels.nn.reference import lora_keep_mask, lora_linear_reference
from ftkernels.ops import lora_linear as ops

CUDA = torch.cuda.is_available()


def make_pair(K, N, r, alpha=16, p=0.0, rslora=False, bias=True, dtype=torch.float32, device="cpu"):
    """(ours, PEFT's) around copies of one random nn.Linear, with the same random A and B."""
    base = nn.Linear(K, N, bias=bias, device=device, dtype=dtype)
    peft_base = nn.Linear(K, N, bias=bias, device=device, dtype=dtype)
    peft_base.load_state_dict(base.state_dict())
    ours = ftk.nn.LoRALinear(base, r=r, alpha=alpha, dropout=p, rslora=rslora)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, use_rslora=rslora)
    peft = PeftLinear(peft_base, "default", config=cfg, r=r, lora_alpha=alpha)
    with torch.no_grad():
        ours.lora_B.normal_()  # B starts at zero: make the adapter path count
        peft.lora_A["default"].weight.copy_(ours.lora_A)
        peft.lora_B["default"].weight.copy_(ours.lora_B)
    ours.to(dtype=dtype), peft.to(dtype=dtype)  # one dtype for all, to compare like with like
    return ours, peft


def grads(y, g, tensors):
    return torch.autograd.grad(y, tensors, g)


TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-5), torch.float16: (2e-2, 2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize(
    ("lead", "K", "N", "r"),
    # the last two: r above min(K, N), legal in PEFT (a 2-class head under "all-linear", r=8)
    [
        ((1,), 3, 5, 1),
        ((2, 7), 33, 17, 4),
        ((64,), 40, 24, 8),
        ((3, 1, 5), 16, 9, 2),
        ((4, 3), 8, 2, 8),
        ((5,), 3, 7, 6),
    ],
)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_matches_peft(dtype, lead, K, N, r, p):
    ours, peft = make_pair(K, N, r, p=p, dtype=dtype)
    ours.base.bias.requires_grad_(True)
    peft.base_layer.bias.requires_grad_(True)
    seed = 20261122
    peft.lora_dropout["default"] = FixedMaskDropout(seed, p) if p > 0 else nn.Identity()
    x = torch.randn(*lead, K, dtype=dtype).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y = ftk.nn.lora_linear(
        x, ours.weight, ours.bias, ours.lora_A, ours.lora_B, ours.scaling, p, True, torch.tensor(seed)
    )
    yp = peft(x2)
    g = torch.randn_like(y)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, yp, atol=atol * 10, rtol=rtol * 10)
    ga = grads(y, g, (x, ours.lora_A, ours.lora_B, ours.base.bias))
    gp = grads(yp, g, (x2, peft.lora_A["default"].weight, peft.lora_B["default"].weight, peft.base_layer.bias))
    for a, b in zip(ga, gp, strict=True):
        torch.testing.assert_close(a, b, atol=atol * 10 * max(1.0, b.abs().max().item()), rtol=rtol * 10)


def test_module_forward_matches_peft_eval_and_train_without_dropout():
    ours, peft = make_pair(24, 12, 4, alpha=8, rslora=True)
    x = torch.randn(5, 24)
    torch.testing.assert_close(ours(x), peft(x))
    ours.eval(), peft.eval()
    torch.testing.assert_close(ours(x), peft(x))
    assert ours.scaling == pytest.approx(8 / math.sqrt(4))


def test_eval_mode_has_no_dropout():
    ours, peft = make_pair(24, 12, 4, p=0.5)
    ours.eval(), peft.eval()
    x = torch.randn(9, 24)
    torch.testing.assert_close(ours(x), peft(x))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("p", "dtype"), [(0.2, torch.float32), (0.0, torch.float32), (0.0, torch.bfloat16)])
def test_many_row_blocks_across_threads(threads, p, dtype):
    """Enough rows for several blocks per thread of the CPU kernel (worker threads do the work), one
    thread (one partial, no reduction), and the dropout-free fp32 path (one block per thread)."""
    ours, _ = make_pair(512, 48, 8, p=p)
    x = torch.randn(700, 512).to(dtype).requires_grad_(True)
    w, bias = ours.weight.to(dtype), ours.bias.to(dtype)
    seed = torch.tensor(9)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = ftk.nn.lora_linear(x, w, bias, ours.lora_A, ours.lora_B, ours.scaling, p, True, seed)
        g = torch.randn_like(y)
        got = grads(y, g, (x, ours.lora_A, ours.lora_B))
    finally:
        torch.set_num_threads(prev)
    leaves = [t.detach().double().requires_grad_(True) for t in (x, ours.lora_A, ours.lora_B)]
    yr = lora_linear_reference(leaves[0], w.double(), bias.double(), leaves[1], leaves[2], ours.scaling, p, 9)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), yr, atol=tol * max(1.0, yr.abs().max().item()), rtol=tol)
    for a, want in zip(got, grads(yr, g.double(), leaves), strict=True):
        torch.testing.assert_close(a.double(), want, atol=tol * max(1.0, want.abs().max().item()), rtol=tol)


def test_no_rows():
    """An empty batch: an empty output, zero adapter grads (not uninitialized memory)."""
    ours, _ = make_pair(12, 6, 2, p=0.3)
    x = torch.randn(0, 12, requires_grad=True)
    y = ours(x)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == (0, 12)
    assert torch.equal(ours.lora_A.grad, torch.zeros_like(ours.lora_A))
    assert torch.equal(ours.lora_B.grad, torch.zeros_like(ours.lora_B))


def test_one_autograd_node_per_layer(lora_node):
    """Eager mode records one node per layer call: no view nodes for a 3-D x, no cast nodes for fp32
    adapters on a bf16 base (the host time of a step grows with its node count)."""
    base = nn.Linear(16, 8).to(torch.bfloat16)
    ours = ftk.nn.LoRALinear(base, r=2, dropout=0.1)
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16, requires_grad=True)
    y = ours(x)
    assert lora_nodes(y.grad_fn) == [1]
    nexts = [type(f).__name__ for f, _ in y.grad_fn.next_functions if f is not None]
    assert nexts == ["AccumulateGrad"] * 3  # x, lora_A, lora_B: straight to the leaves
    y.float().sum().backward()
    assert x.grad.shape == x.shape and ours.lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize("adapter_dtype", [torch.float64, torch.float32])
def test_eager_node_equals_custom_op(adapter_dtype):
    """The eager autograd node and the custom op (what torch.compile traces) run the same kernels:
    bit-identical outputs and grads, for 3-D x, dropout, bias, and adapters of the base's dtype or
    fp32 adapters on an fp64 base (cast inside the op)."""
    torch.manual_seed(4)
    x = torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True)
    w, bias = torch.randn(7, 13, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    a = torch.randn(3, 13, dtype=adapter_dtype, requires_grad=True)
    b = torch.randn(7, 3, dtype=adapter_dtype, requires_grad=True)
    seed = torch.tensor(21)
    y1 = ops.LoRALinearFunction.apply(x, w, bias, a, b, 0.7, 0.3, seed)
    y2 = ops.lora_linear_fwd(x.reshape(-1, 13), w, bias, a, b, 0.7, 0.3, seed)[0].view(2, 5, 7)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    g1, g2 = grads(y1, g, (x, a, b)), grads(y2, g, (x, a, b))
    for u, v in zip(g1, g2, strict=True):
        assert u.dtype == v.dtype and torch.equal(u, v)
    assert g1[1].dtype == g1[2].dtype == adapter_dtype


def test_non_contiguous_input():
    ours, _ = make_pair(20, 10, 3, p=0.2)
    xt = torch.randn(20, 8).t()  # [8, 20] with strides (1, 8)
    seed = torch.tensor(5)
    y = ftk.nn.lora_linear(xt, ours.weight, ours.bias, ours.lora_A, ours.lora_B, ours.scaling, 0.2, True, seed)
    ref = lora_linear_reference(xt, ours.weight, ours.bias, ours.lora_A, ours.lora_B, ours.scaling, 0.2, 5)
    torch.testing.assert_close(y, ref)


def test_gradcheck_float64_with_dropout():
    torch.manual_seed(3)
    x = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(77)

    def f(x, w, b, a, bb):  # fixed seed: one mask; a backward mask different from forward's would fail
        return ftk.nn.lora_linear(x, w, b, a, bb, 1.7, 0.4, True, seed)

    assert torch.autograd.gradcheck(f, (x, w, b, a, bb))
    x3 = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: f(x, w, b, a, bb), (x3,))


def test_same_seed_same_output_and_fresh_seeds_differ():
    ours, _ = make_pair(64, 32, 8, p=0.5)
    x = torch.randn(16, 64)
    torch.manual_seed(1)
    y1 = ours(x)
    torch.manual_seed(1)
    y2 = ours(x)
    y3 = ours(x)
    assert torch.equal(y1, y2)
    assert not torch.equal(y2, y3)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_within_binomial_bounds(p):
    n_rows, n_cols = 300, 333
    keep = lora_keep_mask(123456789, n_rows, n_cols, p)
    kept = ops_keep_cpu(123456789, n_rows, n_cols, p)
    assert torch.equal(keep, kept)  # the C++ stream is the NumPy stream
    n = n_rows * n_cols
    sd = math.sqrt(n * p * (1 - p))
    assert abs(kept.sum().item() - n * (1 - p)) < 5 * sd


def ops_keep_cpu(seed, rows, cols, p):
    """The C++ kernel's mask, read back through the op: u = D(1) I = mask / (1 - p)."""
    x = torch.ones(rows, cols, dtype=torch.float64)
    eye = torch.eye(cols, dtype=torch.float64)
    w = torch.zeros(1, cols, dtype=torch.float64)
    b = torch.zeros(1, cols, dtype=torch.float64)
    _, u = ops.lora_linear_fwd(x, w, None, eye, b, 1.0, p, torch.tensor(seed))
    return u != 0


def test_triton_stream_equals_reference():
    from ftkernels.triton import lora_linear as tk

    for seed, rows, cols, p in [(2**62 - 1, 17, 45, 0.1), (0, 3, 8, 0.5), (987654321987, 33, 64, 0.3)]:
        ref = lora_keep_mask(seed, rows, cols, p)
        # Triton kernels run on the GPU when there is one, else through the interpreter on CPU.
        seed_t = torch.tensor(seed, device="cuda" if CUDA else "cpu")
        assert torch.equal(tk.keep_mask(seed_t, rows, cols, p).cpu(), ref)


@pytest.mark.parametrize("choice", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(37, 40, 23, 5), (9, 12, 2, 16)])  # the second: r > min(K, N)
def test_triton_path_against_reference(choice, dtype, p, shape):
    """The GPU implementation (both GEMM routes), here through Triton's interpreter on CPU tensors."""
    from ftkernels.triton import lora_linear as tk

    dev = "cuda" if CUDA else "cpu"
    M, K, N, r = shape
    x = torch.randn(M, K, dtype=dtype, device=dev)
    w = torch.randn(N, K, dtype=dtype, device=dev) / 4
    b = torch.randn(N, dtype=dtype, device=dev)
    a = torch.randn(r, K, dtype=dtype, device=dev)
    bb = torch.randn(N, r, dtype=dtype, device=dev)
    seed = torch.tensor(4242, device=dev)
    y, u = tk.forward(x, w, b, a, bb, 0.7, p, seed, choice)
    g = torch.randn_like(y)
    gx, ga, gb = tk.backward(g, x, w, a, bb, u, 0.7, p, seed, True, choice)
    leaves = [t.double().requires_grad_(True) for t in (x, a, bb)]
    yr = lora_linear_reference(leaves[0], w.double(), b.double(), leaves[1], leaves[2], 0.7, p, 4242)
    gr = torch.autograd.grad(yr, leaves, g.double())
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for got, want in zip((y, gx, ga, gb), (yr, *gr), strict=True):
        torch.testing.assert_close(got.double(), want, atol=tol * max(1.0, want.abs().max().item()), rtol=tol)
    _, ga2, gb2 = tk.backward(g, x, w, a, bb, u, 0.7, p, seed, False, choice)
    torch.testing.assert_close(ga2, ga)
    torch.testing.assert_close(gb2, gb)


def test_merge_unmerge():
    ours, _ = make_pair(30, 20, 4)
    x = torch.randn(7, 30)
    y = ours(x)
    w0 = ours.weight.clone()
    ours.merge()
    assert ours.merged
    torch.testing.assert_close(ours(x), y, atol=1e-5, rtol=1e-5)
    ours.unmerge()
    torch.testing.assert_close(ours.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(x), y)
    with pytest.warns(UserWarning):
        ours.unmerge()


def test_saved_tensors_hold_no_dropped_copy():
    """Autograd keeps x (the caller's), u [M, r], the weights and the seed: no M x K tensor but x."""
    M, K, N, r = 64, 48, 40, 4
    ours, _ = make_pair(K, N, r, p=0.3)
    x = torch.randn(M, K, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ours(x)
    big = [t for t in saved if t.numel() >= M * K]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert any(tuple(t.shape) == (M, r) for t in saved)
    y.sum().backward()
    assert ours.lora_A.grad is not None and ours.base.weight.grad is None


def test_frozen_input_skips_grad_x():
    ours, _ = make_pair(16, 8, 2, p=0.1)
    x = torch.randn(5, 16)
    ours(x).sum().backward()
    assert ours.lora_A.grad.abs().sum() > 0 and ours.lora_B.grad.abs().sum() > 0


def test_bf16_base_with_fp32_adapters_and_autocast():
    base = nn.Linear(32, 16).to(torch.bfloat16)
    ours = ftk.nn.LoRALinear(base, r=4)
    assert ours.lora_A.dtype == torch.float32
    with torch.no_grad():
        ours.lora_B.normal_()
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.bfloat16
    ref = lora_linear_reference(
        x.double(), base.weight.double(), base.bias.double(), ours.lora_A.double(), ours.lora_B.double(), ours.scaling
    )
    torch.testing.assert_close(y.double(), ref, atol=0.1, rtol=3e-2)
    y.float().sum().backward()
    assert ours.lora_A.grad.dtype == torch.float32
    fp32 = ftk.nn.LoRALinear(nn.Linear(32, 16), r=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = fp32(torch.randn(6, 32))
        xb = torch.randn(6, 32, dtype=torch.bfloat16)  # a bf16 activation from an earlier autocast layer
        yb, refb = fp32(xb), fp32.base(xb) + fp32.scaling * (xb @ fp32.lora_A.t() @ fp32.lora_B.t())
    assert ya.dtype == yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), refb.float(), atol=0.05, rtol=2e-2)


def test_bases_whose_forward_the_fused_layer_would_skip():
    """The fused layer computes ``x W^T + b`` itself: a subclass whose own forward computes something
    else, or a non-float weight, is refused; one computing the same (Falcon's reordered Linear) and a
    mere subclass (nn.MultiheadAttention's out_proj) are fine; forward hooks on the base warn that
    they will not run."""

    class Doubled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class Reordered(nn.Linear):  # Falcon's FalconLinear: x @ W.T + b, the same math
        def forward(self, x):
            return x @ self.weight.T + self.bias

    class Router(nn.Linear):  # PhiMoE's router: a Linear returning (weights, indices); was an AttributeError
        def forward(self, x):
            return super().forward(x).softmax(-1).topk(2)

    with pytest.raises(TypeError, match="Doubled overrides Linear.forward and computes something else"):
        ftk.nn.LoRALinear(Doubled(4, 3), r=2)
    with pytest.raises(TypeError, match="Router overrides Linear.forward and computes something else"):
        ftk.nn.LoRALinear(Router(4, 3), r=2)
    same = Reordered(4, 3)
    layer = ftk.nn.LoRALinear(same, r=2)
    x = torch.randn(5, 4)
    torch.testing.assert_close(layer(x), same(x))
    int8 = nn.Linear(4, 3)
    int8.weight = nn.Parameter(torch.ones(3, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="plain floating-point tensor"):
        ftk.nn.LoRALinear(int8, r=2)
    mha = nn.MultiheadAttention(8, 2)
    layer = ftk.nn.LoRALinear(mha.out_proj, r=2)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), mha.out_proj(x))
    hooked = nn.Linear(4, 3)
    hooked.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="forward hooks"):
        ftk.nn.LoRALinear(hooked, r=2)


def test_bad_input_errors():
    lin = nn.Linear(8, 4)
    with pytest.raises(TypeError, match="nn.Linear"):
        ftk.nn.LoRALinear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="dropout"):
        ftk.nn.LoRALinear(lin, r=2, dropout=1.0)
    for r in (0, 2.0, True):
        with pytest.raises(ValueError, match="r must be a positive int"):
            ftk.nn.LoRALinear(lin, r=r)
    for alpha in (float("nan"), float("inf"), "16"):  # a NaN scaling would poison every output
        with pytest.raises(ValueError, match="alpha must be a finite number"):
            ftk.nn.LoRALinear(lin, r=2, alpha=alpha)
    np_layer = ftk.nn.LoRALinear(lin, r=np.int64(2), alpha=np.float32(3.0))  # numpy scalars are numbers too
    assert type(np_layer.r) is int and type(np_layer.scaling) is float and np_layer.scaling == 1.5
    m = ftk.nn.LoRALinear(lin, r=2)
    with pytest.raises(ValueError, match="expected"):
        m(torch.randn(3, 7))
    with pytest.raises(TypeError, match="must match"):
        m(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="expected"):
        m(torch.tensor(1.0))
    with pytest.raises(ValueError, match="x is on meta but the layer is on cpu"):
        m(torch.empty(3, 8, device="meta"))
    args = (torch.randn(3, 8), lin.weight, lin.bias, m.lora_A, m.lora_B, 2.0, 0.1, True)
    for seed in (7, torch.tensor(7.0), torch.tensor([1, 2]), torch.tensor(7, device="meta")):
        with pytest.raises(ValueError, match="seed must be an int64 scalar tensor on cpu"):
            ftk.nn.lora_linear(*args, seed)


def test_from_peft_layer():
    _, peft = make_pair(24, 12, 4, alpha=32, p=0.1, rslora=True)
    ours = ftk.nn.LoRALinear.from_peft_layer(peft)
    assert (ours.r, ours.alpha, ours.dropout, ours.rslora) == (4, 32, 0.1, True)
    assert ours.scaling == peft.scaling["default"]
    ours.eval(), peft.eval()
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(ours(x), peft(x))
    assert ours.base is peft.base_layer and not ours.base.weight.requires_grad


def test_custom_ops_opcheck():
    x = torch.randn(9, 12)
    w, bias = torch.randn(7, 12), torch.randn(7)
    a, b = torch.randn(3, 12, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    seed = torch.tensor(11)
    torch.library.opcheck(ops.lora_linear_fwd, (x, w, bias, a, b, 0.5, 0.2, seed))
    torch.library.opcheck(ops.lora_linear_fwd, (x.requires_grad_(True), w, None, a, b, 0.5, 0.0, seed))
    y, u = ops.lora_linear_fwd(x.detach(), w, bias, a.detach(), b.detach(), 0.5, 0.2, seed)
    g = torch.randn_like(y)
    torch.library.opcheck(ops.lora_linear_bwd, (g, x.detach(), w, a.detach(), b.detach(), u, 0.5, 0.2, seed, True))
    torch.library.opcheck(ops.lora_linear_bwd, (g, x.detach(), w, a.detach(), b.detach(), u, 0.5, 0.2, seed, False))


def test_compiles_without_graph_breaks():
    ours, _ = make_pair(16, 8, 2, p=0.2)
    model = nn.Sequential(ours, nn.GELU())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 16)
    torch.manual_seed(0)
    y = compiled(x)
    torch.manual_seed(0)
    ye = model(x)
    assert y.shape == (4, 8)
    y.sum().backward()
    assert ours.lora_A.grad is not None
    torch.testing.assert_close(y, ye)  # same seed drawn: the traced custom op equals the eager node
    ours.eval()
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_matches_peft(dtype, p):
    ours, peft = make_pair(256, 192, 16, p=p, dtype=dtype, device="cuda")
    ours.base.bias.requires_grad_(True)
    peft.base_layer.bias.requires_grad_(True)
    seed = 99
    peft.lora_dropout["default"] = FixedMaskDropout(seed, p) if p > 0 else nn.Identity()
    x = torch.randn(4, 33, 256, dtype=dtype, device="cuda", requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y = ftk.nn.lora_linear(
        x, ours.weight, ours.bias, ours.lora_A, ours.lora_B, ours.scaling, p, True, torch.tensor(seed, device="cuda")
    )
    yp = peft(x2)
    g = torch.randn_like(y)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(y, yp, atol=tol * 4, rtol=tol)
    ga = grads(y, g, (x, ours.lora_A, ours.lora_B, ours.base.bias))
    gp = grads(yp, g, (x2, peft.lora_A["default"].weight, peft.lora_B["default"].weight, peft.base_layer.bias))
    for a, b in zip(ga, gp, strict=True):
        torch.testing.assert_close(a, b, atol=tol * 4 * max(1.0, b.abs().max().item()), rtol=tol)


@pytest.mark.cuda
def test_cuda_stream_equals_cpu():
    from ftkernels.triton import lora_linear as tk

    m = tk.keep_mask(torch.tensor(31337, device="cuda"), 129, 257, 0.3).cpu()
    assert torch.equal(m, lora_keep_mask(31337, 129, 257, 0.3))
    assert torch.equal(m, ops_keep_cpu(31337, 129, 257, 0.3))


@pytest.mark.skipif(CUDA, reason="with a GPU the kernels run for real (the CUDA tests)")
def test_triton_kernels_compile_for_gpu_targets():
    """Ahead-of-time compilation for sm_90 and sm_80 (no GPU needed; in a subprocess because the
    interpreter replaces @triton.jit functions in this one)."""
    import os
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parent / "helpers" / "triton_aot.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for cap in ("90", "80"):
        out = subprocess.run([sys.executable, str(script), cap], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"all kernels compiled for sm_{cap}" in out.stdout


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
@pytest.mark.parametrize("node", [True, False])
@pytest.mark.parametrize("grouped", [False, True])
def test_outputs_take_in_place_ops(monkeypatch, node, grouped, device):
    """``h = proj(x); h += residual`` or an in-place activation on a [B, T, N] output: autograd refuses
    in-place ops on a custom node's output that is a view made inside it (Falcon's decoder does
    ``mlp_output += attention_output``), so the outputs are tensors of their own. Grads as with
    nn.Linear plus the plain LoRA path (eval: no dropout), on the C++ node, the Python Functions and a
    shared-input group."""
    monkeypatch.setattr(ops, "_node_on", node)
    torch.manual_seed(0)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(8, 6), nn.Linear(8, 6)

        def forward(self, x):
            q, k = self.q(x), self.k(x)
            q.mul_(2)  # in place on both outputs
            k += q
            return torch.relu_(k)

    plain = Pair()
    model = ftk.apply_lora(copy.deepcopy(plain), ["q", "k"], r=2) if grouped else copy.deepcopy(plain)
    if not grouped:
        model.q, model.k = ftk.nn.LoRALinear(model.q, r=2), ftk.nn.LoRALinear(model.k, r=2)
    with torch.no_grad():
        for m in (model.q, model.k):
            m.lora_B.normal_()
    model.to(device).eval()
    x = torch.randn(2, 5, 8, device=device, requires_grad=True)
    for _ in range(2):  # a group fuses from its second call
        y = model(x)
    if grouped:
        assert lora_nodes(y.grad_fn) == [2]

    def ref(x):
        q, k = (F.linear(x, m.weight, m.bias) + m.scaling * x @ m.lora_A.T @ m.lora_B.T for m in (model.q, model.k))
        return torch.relu(k + 2 * q)

    g = torch.randn_like(y)
    leaves = [x, model.q.lora_A, model.k.lora_B]
    for a, b in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref(x), leaves, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
