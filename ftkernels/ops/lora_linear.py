"""``torch.library`` custom ops of the fused LoRA Linear, over the CPU C++ kernel and the Triton kernels.

``ftkernels::lora_linear_fwd(x, weight, bias, lora_a, lora_b, scaling, dropout, seed) -> (y, u)``
    ``u = D(x) A^T`` (``[M, r]``, kept elements scaled by ``1/(1-p)``), ``y = x W^T + b + s u B^T``.
``ftkernels::lora_linear_bwd(grad, x, weight, lora_a, lora_b, u, scaling, dropout, seed, need_x)
-> (grad_x, grad_a, grad_b)``
    ``v = s g B``; ``grad_B = s g^T u``; ``grad_A = v^T D(x)``; ``grad_x = g W + D'(v A)`` (an empty
    tensor when ``need_x`` is false).

x is ``[M, K]``, W ``[N, K]``, A ``[r, K]``, B ``[N, r]``, all one dtype and device; ``seed`` is an int64
scalar tensor on x's device (read in-kernel on GPU: no host sync). The mask D is a pure function of
(seed, row, column) (``csrc/include/ftk/lora.h``), so backward regenerates it: saved state is x, u and
the seed. Both ops have fake implementations, so ``torch.compile`` traces through them, and the
forward op has its autograd formula registered.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .._ext import C, ExtensionError


def _gemm_choice() -> str:
    choice = os.environ.get("FTKERNELS_LORA_GEMM", "auto")
    if choice not in ("auto", "triton", "cublas"):
        raise ValueError(f"FTKERNELS_LORA_GEMM must be auto, triton or cublas, got {choice!r}")
    return choice


@torch.library.custom_op("ftkernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float, dropout: float,
    seed: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    raise ExtensionError(f"ftkernels lora_linear has no kernel for device {x.device} (cpu and cuda are served)")


@torch.library.custom_op("ftkernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    grad: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, u: Tensor, scaling: float,
    dropout: float, seed: Tensor, need_x: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    raise ExtensionError(f"ftkernels lora_linear has no kernel for device {x.device} (cpu and cuda are served)")


@lora_linear_fwd.register_kernel("cpu")
def _fwd_cpu(x, weight, bias, lora_a, lora_b, scaling, dropout, seed):
    return C().lora_linear_fwd_cpu(x, weight, bias, lora_a, lora_b, scaling, dropout, int(seed))


@lora_linear_bwd.register_kernel("cpu")
def _bwd_cpu(grad, x, weight, lora_a, lora_b, u, scaling, dropout, seed, need_x):
    return C().lora_linear_bwd_cpu(grad.contiguous(), x, weight, lora_a, lora_b, u, scaling, dropout, int(seed), need_x)


@lora_linear_fwd.register_kernel("cuda")
def _fwd_cuda(x, weight, bias, lora_a, lora_b, scaling, dropout, seed):
    from ..triton import lora_linear as tk

    return tk.forward(x, weight, bias, lora_a, lora_b, scaling, dropout, seed, _gemm_choice())


@lora_linear_bwd.register_kernel("cuda")
def _bwd_cuda(grad, x, weight, lora_a, lora_b, u, scaling, dropout, seed, need_x):
    from ..triton import lora_linear as tk

    return tk.backward(grad.contiguous(), x, weight, lora_a, lora_b, u, scaling, dropout, seed, need_x, _gemm_choice())


@lora_linear_fwd.register_fake
def _fwd_fake(x, weight, bias, lora_a, lora_b, scaling, dropout, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


@lora_linear_bwd.register_fake
def _bwd_fake(grad, x, weight, lora_a, lora_b, u, scaling, dropout, seed, need_x):
    gx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
    return gx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, dropout, seed = inputs
    _, u = output
    # x is the caller's own activation (alive anyway); u is M x r; no dropped copy of x is kept.
    ctx.save_for_backward(x, weight, lora_a, lora_b, u, seed)
    ctx.scaling, ctx.dropout = scaling, dropout
    ctx.mark_non_differentiable(u)


def _backward(ctx, grad_y, _grad_u):
    x, weight, lora_a, lora_b, u, seed = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    grad_x = grad_a = grad_b = grad_w = grad_bias = None
    if need_x or need_a or need_b:
        gx, ga, gb = lora_linear_bwd(grad_y, x, weight, lora_a, lora_b, u, ctx.scaling, ctx.dropout, seed, need_x)
        grad_x = gx if need_x else None
        grad_a = ga if need_a else None
        grad_b = gb if need_b else None
    if need_w:  # an unfrozen base weight: plain dW = g^T x
        grad_w = grad_y.t() @ x
    if need_bias:
        grad_bias = grad_y.sum(0)
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


torch.library.register_autograd("ftkernels::lora_linear_fwd", _backward, setup_context=_setup_context)
