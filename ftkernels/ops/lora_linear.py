"""``torch.library`` custom ops of the fused LoRA Linear, over the CPU C++ kernel and the Triton kernels.

``ftkernels::lora_linear_fwd(x, weight, bias, lora_a, lora_b, scaling, dropout, seed) -> (y, u)``
    ``u = D(x) A^T`` (``[M, r]``, kept elements scaled by ``1/(1-p)``), ``y = x W^T + b + s u B^T``.
``ftkernels::lora_linear_bwd(grad, x, weight, lora_a, lora_b, u, scaling, dropout, seed, need_x)
-> (grad_x, grad_a, grad_b)``
    ``v = s g B``; ``grad_B = s g^T u``; ``grad_A = v^T D(x)``; ``grad_x = g W + D'(v A)`` (an empty
    tensor when ``need_x`` is false).

x is ``[M, K]``, W ``[N, K]``, A ``[r, K]``, B ``[N, r]``, one device; x and W share a dtype, the
adapters may have another (fp32 adapters on a bf16 base: cast inside, their grads returned in
their dtype). ``seed`` is an int64 scalar tensor on x's device (read in-kernel on GPU: no host
sync). The mask D is a pure function of (seed, row, column) (``csrc/include/ftk/lora.h``), so
backward regenerates it: saved state is x, u and the seed (in eager mode x itself is often not
kept: :mod:`.input_recompute` rebuilds it from what its producer keeps). Both ops have fake implementations, so
``torch.compile`` traces through them, and the forward op has its autograd formula registered; in
eager mode :class:`LoRALinearFunction` runs the same kernels with less host time.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor

from .._ext import C, ExtensionError, available
from . import input_recompute, torch_func
from ._autograd import batched, first_order, unviewed


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """t in ``dtype`` (None stays None); skips the call's dispatch when nothing changes."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _fwd_impl(x, weight, bias, lora_a, lora_b, scaling, dropout, seed):
    """Device dispatch of the forward, adapters cast to x's dtype: (y, u)."""
    lora_a, lora_b = _as(lora_a, x.dtype), _as(lora_b, x.dtype)
    if x.device.type == "cpu":
        return C().lora_linear_fwd_cpu(x, weight, bias, lora_a, lora_b, scaling, dropout, int(seed))
    if x.device.type == "cuda":
        from ..triton import lora_linear as tk

        return tk.forward(x, weight, bias, lora_a, lora_b, scaling, dropout, seed, tk.GEMM_ROUTE.setting())
    raise ExtensionError(f"ftkernels lora_linear has no kernel for device {x.device} (cpu and cuda are served)")


def _bwd_impl(grad, x, weight, lora_a, lora_b, u, scaling, dropout, seed, need_x, grad_x_acc=None):
    """Device dispatch of the backward: (grad_x or empty, grad_A, grad_B), the adapter grads in the
    adapters' own dtype (fp32 adapters on a bf16 base get fp32 grads, as autograd's cast would give).
    With ``grad_x_acc`` (contiguous, x's shape and dtype) grad_x is added into it and returned."""
    a, b = _as(lora_a, x.dtype), _as(lora_b, x.dtype)
    if batched(grad):  # a backward under vmap: no kernel takes batched tensors
        gx, ga, gb = torch_func.lora_linear_bwd(grad, x, weight, a, b, u, scaling, dropout, seed, need_x, grad_x_acc)
        return gx, _as(ga, lora_a.dtype), _as(gb, lora_b.dtype)
    grad = grad.contiguous()
    if x.device.type == "cpu":
        gx, ga, gb = C().lora_linear_bwd_cpu(grad, x, weight, a, b, u, scaling, dropout, int(seed), need_x, grad_x_acc)
    elif x.device.type == "cuda":
        from ..triton import lora_linear as tk

        gx, ga, gb = tk.backward(
            grad, x, weight, a, b, u, scaling, dropout, seed, need_x, tk.GEMM_ROUTE.setting(), grad_x_acc
        )
    else:
        raise ExtensionError(f"ftkernels lora_linear has no kernel for device {x.device} (cpu and cuda are served)")
    return gx, _as(ga, lora_a.dtype), _as(gb, lora_b.dtype)


@torch.library.custom_op("ftkernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float, dropout: float,
    seed: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    return _fwd_impl(x, weight, bias, lora_a, lora_b, scaling, dropout, seed)


@torch.library.custom_op("ftkernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    grad: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, u: Tensor, scaling: float,
    dropout: float, seed: Tensor, need_x: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return _bwd_impl(grad, x, weight, lora_a, lora_b, u, scaling, dropout, seed, need_x)


@lora_linear_fwd.register_fake
def _fwd_fake(x, weight, bias, lora_a, lora_b, scaling, dropout, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


@lora_linear_bwd.register_fake
def _bwd_fake(grad, x, weight, lora_a, lora_b, u, scaling, dropout, seed, need_x):
    gx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
    return gx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def layer_grads(grad_y, saved, scaling, dropout, adapter_dtypes, needs, bwd, grad_x_acc=None):
    """``(grad_x, grad_W, grad_bias, grad_A, grad_B)`` of one layer from its saved ``(x, weight, lora_a,
    lora_b, u, seed)``, each None unless ``needs`` (five bools, same order) asks for it. ``bwd`` is the
    backward op (the custom op when traced, its implementation in eager mode); ``grad_x_acc`` (eager
    only) is a buffer grad_x is added into, as :func:`_bwd_impl` takes it."""
    x, weight, lora_a, lora_b, u, seed = saved
    need_x, need_w, need_bias, need_a, need_b = needs
    grad_x = grad_a = grad_b = grad_w = grad_bias = None
    if need_x or need_a or need_b:
        acc = {} if grad_x_acc is None else {"grad_x_acc": grad_x_acc}
        gx, ga, gb = bwd(grad_y, x, weight, lora_a, lora_b, u, scaling, dropout, seed, need_x, **acc)
        grad_x = gx if need_x else None
        grad_a = _as(ga, adapter_dtypes[0]) if need_a else None
        grad_b = _as(gb, adapter_dtypes[1]) if need_b else None
    if need_w:  # an unfrozen base weight: plain dW = g^T x
        grad_w = grad_y.t() @ x
    if need_bias:
        grad_bias = grad_y.sum(0)
    return grad_x, grad_w, grad_bias, grad_a, grad_b


def _grads(ctx, grad_y, bwd):
    """The forward's input grads (:func:`layer_grads` from the context, None for the non-tensor inputs)."""
    grads = layer_grads(
        grad_y, saved_with_x(ctx), ctx.scaling, ctx.dropout, ctx.adapter_dtypes, ctx.needs_input_grad[:5], bwd
    )
    return *grads, None, None, None


def _save(ctx, x, weight, lora_a, lora_b, u, seed, scaling, dropout, adapter_dtypes, x_orig=None):
    """Save the layer's backward state. x (2-D) itself, or, given the caller's ``x_orig`` (x before
    flattening), what its producer keeps to rebuild it (:mod:`.input_recompute`); u is M x r; no
    dropped copy of x is ever kept (the mask is regenerated from the seed)."""
    save_x(ctx, x, x_orig, weight, lora_a, lora_b, u, seed)
    ctx.scaling, ctx.dropout, ctx.adapter_dtypes = scaling, dropout, adapter_dtypes


def save_x(ctx, x: Tensor, x_orig: Tensor | None, *others: Tensor) -> None:
    """``ctx.save_for_backward(x, *others)``, x (2-D) replaced by what its producer keeps when
    ``x_orig`` (x before flattening; None: compiled path) can be rebuilt from it. Read back with
    :func:`saved_with_x`."""
    p = input_recompute.plan(x_orig) if x_orig is not None else None
    xs, ctx.x_spec = ((x,), None) if p is None else (p.tensors, p.spec)
    ctx.n_x = len(xs)
    ctx.save_for_backward(*xs, *others)


def saved_with_x(ctx) -> tuple:
    """``ctx.saved_tensors`` as saved by :func:`_save`, with x first as a 2-D tensor (rebuilt when
    its producer's tensors were saved instead)."""
    saved = ctx.saved_tensors
    n = ctx.n_x
    if ctx.x_spec is None:
        return saved
    x = input_recompute.rebuild(input_recompute.Plan(ctx.x_spec, saved[:n]))
    return (x.reshape(-1, x.shape[-1]), *saved[n:])


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, dropout, seed = inputs
    _save(ctx, x, weight, lora_a, lora_b, output[1], seed, scaling, dropout, (lora_a.dtype, lora_b.dtype))
    ctx.mark_non_differentiable(output[1])


torch.library.register_autograd(
    "ftkernels::lora_linear_fwd", lambda ctx, grad_y, _grad_u: _grads(ctx, grad_y, lora_linear_bwd),
    setup_context=_setup_context,
)  # fmt: skip


class LoRALinearFunction(torch.autograd.Function):
    """The eager-mode autograd node: the same kernels and formulas as the custom ops, called directly,
    on x of any leading shape (flattened inside: no view nodes around it).

    ``torch.library`` custom ops cost ~0.5 ms of Python per layer step in eager mode on a slow host
    (argument re-binding through the schema, a generated autograd.Function, two redispatches),
    more than the kernels of a small layer; :func:`lora_linear_y` uses this node unless
    ``torch.compile`` traces.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout, seed):
        flat = x.dim() != 2  # a 2-D x skips the reshape and view calls (~10 us each on a slow host)
        x2 = x.reshape(-1, x.shape[-1]) if flat else x
        a, b = _as(lora_a, x.dtype), _as(lora_b, x.dtype)  # cast once: backward reuses the r-row copies
        with _no_autocast(x):
            y, u = _fwd_impl(x2, weight, bias, a, b, scaling, dropout, seed)
        _save(ctx, x2, weight, a, b, u, seed, scaling, dropout, (lora_a.dtype, lora_b.dtype), x_orig=x)
        ctx.x_shape = x.shape if flat else None
        return unviewed(y.view(*x.shape[:-1], y.shape[-1])) if flat else y

    @staticmethod
    @first_order
    def backward(ctx, grad_y):
        flat = ctx.x_shape is not None
        with _no_autocast(grad_y):
            grads = _grads(ctx, grad_y.reshape(-1, grad_y.shape[-1]) if flat else grad_y, _bwd_impl)
        gx = grads[0]
        return (gx.view(ctx.x_shape) if flat and gx is not None else gx, *grads[1:])


_NULL = contextlib.nullcontext()  # reusable: one object for every call with autocast off


def _no_autocast(t: Tensor):
    """Autocast off around the kernels (their inner matmuls run in the dtypes chosen here, as a custom
    op's kernel does); a no-op context when it is off already."""
    dev = t.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return _NULL


NODE_ENV = "FTKERNELS_LORA_NODE"  # "0": eager calls use the Python autograd Functions (A/B timing)
_node_on = os.environ.get(NODE_ENV, "1") != "0"


@functools.cache
def _cuda_mask() -> bool:
    """Whether the extension has the CUDA dropout-mask kernel of the node (asked once)."""
    return "cuda" in C().build_info()["native_ops"].get("lora_mask_apply", [])


_graph_routing = 0  # > 0 inside graph_routing()


@contextlib.contextmanager
def graph_routing():
    """Inside it, CUDA calls with dropout take the Python route's Triton kernels instead of the C++
    node. Those kernels fuse the mask into the rank-r GEMMs (~6 passes over x fewer per layer step
    than the node's mask kernel around cuBLAS), which pays where host time does not count: a step
    captured in a CUDA graph. Enter it for the warm-up as well as the capture, because Triton cannot
    load a kernel while a stream is capturing: the warm-up must have run the kernels the capture
    launches. :class:`ftkernels.graphed_step.GraphedTrainStep` does both. A capture outside it gets the
    node, whose kernels are capture-safe."""
    global _graph_routing
    _graph_routing += 1
    try:
        yield
    finally:
        _graph_routing -= 1


def node_serves(x: Tensor, dropouts) -> bool:
    """Whether the C++ autograd node (csrc/autograd/lora_linear.cpp) serves an eager call on x: any
    call on CPU; on CUDA, calls on the cuBLAS route (the default), with dropout when the extension was
    built with CUDA (the node's mask kernel) and not inside :func:`graph_routing`. Off with
    ``FTKERNELS_LORA_NODE=0``."""
    if not _node_on:
        return False
    dev = x.device.type
    if dev == "cpu":
        return available()
    if dev != "cuda" or not available():
        return False
    if (_graph_routing or not _cuda_mask()) and any(p > 0 for p in dropouts):
        return False
    from ..triton import lora_linear as tk

    return tk.GEMM_ROUTE.setting() == "cublas"


def node_ys(x: Tensor, members, scalings, dropouts, dense_cpu: bool = False) -> list[Tensor]:
    """``[y_1, ..., y_G]`` of G layers on x through the C++ node; ``members`` as in
    :func:`ftkernels.ops.lora_group.lora_group_ys`. x is kept, or rebuilt in backward from what its
    producer keeps (:mod:`.input_recompute`). ``dense_cpu`` (tests) runs a CPU call on the GEMM route
    that CUDA calls take (cuBLAS GEMMs and the mask kernel) instead of the CPU kernels."""
    kept, prog = input_recompute.kept_and_program(x)
    biases = [m[1] for m in members if m[1] is not None]
    bias_of, j = [], 0
    for m in members:
        bias_of.append(-1 if m[1] is None else j)
        j += m[1] is not None
    return C().lora_linear_node(
        x, [m[0] for m in members], biases, [m[2] for m in members], [m[3] for m in members], bias_of,
        list(scalings), list(dropouts), [m[4] for m in members], kept, prog, dense_cpu,
    )  # fmt: skip


def lora_linear_y(x, weight, bias, lora_a, lora_b, scaling: float, dropout: float, seed: Tensor) -> Tensor:
    """``y`` (``[..., N]``) of ``ftkernels::lora_linear_fwd`` for x ``[..., K]``, with autograd: through
    the custom op when ``torch.compile`` traces, else with plain torch ops inside a ``torch.func``
    transform (:mod:`.torch_func`), else through the C++ node where it serves the call
    (:func:`node_serves`: no Python in the step's backward), else through :class:`LoRALinearFunction`
    (the same kernels as the custom op, less host time)."""
    if torch.compiler.is_compiling():
        y = lora_linear_fwd(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scaling, dropout, seed)[0]
        return y.view(*x.shape[:-1], y.shape[-1])
    if torch_func.active():  # no autograd node runs under a torch.func transform: plain ops
        return torch_func.lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout, seed)
    if node_serves(x, (dropout,)):  # the lists of node_ys written out for one member: host time
        kept, prog = input_recompute.kept_and_program(x)
        biases, bias_of = ([], [-1]) if bias is None else ([bias], [0])
        return C().lora_linear_node(
            x, [weight], biases, [lora_a], [lora_b], bias_of, [scaling], [dropout], [seed], kept, prog
        )[0]
    return LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, dropout, seed)
