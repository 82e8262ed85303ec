"""The low-rank path of LoRA over a quantized base layer (QLoRA), as one autograd node.

``delta = s (D(x_c) A_c^T) B_c^T`` in the compute dtype ``c`` (x, A and B cast to it), returned in
``out_dtype``. The base output comes from the quantized layer itself (bitsandbytes dequantizes in its
own kernels); this node replaces PEFT's dropout -> lora_A -> lora_B -> scale -> cast chain. It saves
``u = D(x_c) A_c^T`` (``[M, r]``), the dropout seed and x as given, or, where x's producer keeps what
rebuilds it (a norm, an activation, SwiGLU's product: :mod:`.input_recompute`), that instead (the
frozen quantized base keeps no x: its input gradient needs only the weight). The dropped, cast copy of
x that PEFT's ``lora_A`` keeps for backward (``M x K`` fp32 for fp32 adapters: twice a bf16 x's bytes,
one per layer even where q/k/v read the same x) is never stored; backward regenerates the mask.

Backward, with ``v = s g B``: ``grad_B = s g^T u``, ``grad_A = v^T D(x_c)``, ``grad_x = D(v A)`` (the
adapter's share; autograd adds the base layer's). DoRA with dropout takes the same node for its
low-rank path (:func:`ftkernels.nn.dora.dora_linear`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import torch_func
from ._autograd import first_order, unviewed
from .lora_dropout import lora_dropout_nograd
from .lora_linear import _as, save_x, saved_with_x


class LoRADeltaFunction(torch.autograd.Function):
    """The eager node of :func:`lora_delta` (x of any leading shape, flattened inside)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling, dropout, seed, dtype, out_dtype):
        x2 = x.reshape(-1, x.shape[-1])
        a, b = _as(lora_a, dtype), _as(lora_b, dtype)
        xc = _as(x2, dtype)
        d = lora_dropout_nograd(xc, dropout, seed) if dropout > 0 else xc
        u = d @ a.t()
        del d, xc  # (the dropped copy lives only here)
        out = _as((u @ b.t()).mul_(scaling), out_dtype)
        save_x(ctx, x2, x, a, b, u, seed)  # (x, or what its producer keeps to rebuild it)
        ctx.scaling, ctx.dropout, ctx.dtype, ctx.x_shape = scaling, dropout, dtype, x.shape
        ctx.adapter_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.mark_non_differentiable(u)
        return unviewed(out.view(*x.shape[:-1], out.shape[-1])), u

    @staticmethod
    @first_order
    def backward(ctx, grad, _grad_u):
        x2, a, b, u, seed = saved_with_x(ctx)
        s, p, dtype = ctx.scaling, ctx.dropout, ctx.dtype
        g = _as(grad.reshape(-1, grad.shape[-1]), dtype)
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = _as((g.t() @ u).mul_(s), ctx.adapter_dtypes[1])
        if need_a or need_x:
            v = (g @ b).mul_(s)
            if need_a:
                xc = _as(x2, dtype)
                grad_a = _as(v.t() @ (lora_dropout_nograd(xc, p, seed) if p > 0 else xc), ctx.adapter_dtypes[0])
            if need_x:
                gx = v @ a
                gx = lora_dropout_nograd(gx, p, seed) if p > 0 else gx  # D is its own adjoint
                grad_x = _as(gx, x2.dtype).view(ctx.x_shape)
        return grad_x, grad_a, grad_b, None, None, None, None, None


def lora_delta(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    dropout: float,
    seed: Tensor,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
    with_u: bool = False,
):
    """``s (D(x_c) A_c^T) B_c^T`` (``[..., N]`` in ``out_dtype``) for x ``[..., K]``, A ``[r, K]``, B ``[N, r]``:
    x, A and B cast to ``dtype`` (``_c``), D the LoRA dropout of probability ``dropout`` (kept elements
    scaled by ``1/(1-p)``) from the Philox stream of ``seed`` (an int64 scalar tensor on x's device).
    With ``with_u``, also ``u = D(x_c) A_c^T`` (``[M, r]``, rows of x flattened; no gradient flows through
    it). Eager calls take :class:`LoRADeltaFunction`; ``torch.compile`` traces and ``torch.func``
    transforms (and :func:`ftkernels.plain_ops`) get the same math in plain ops (the dropout as the
    ``ftkernels::lora_dropout`` custom op)."""
    if torch.compiler.is_compiling() or torch_func.active():
        xd = torch_func.dropped(_as(x, dtype), dropout, seed)
        u = xd.reshape(-1, x.shape[-1]) @ _as(lora_a, dtype).t()
        out = _as((u @ _as(lora_b, dtype).t() * scaling).view(*x.shape[:-1], lora_b.shape[0]), out_dtype)
    else:
        out, u = LoRADeltaFunction.apply(x, lora_a, lora_b, scaling, dropout, seed, dtype, out_dtype)
    return (out, u) if with_u else out


class _DequantLinear(torch.autograd.Function):
    """``x W^T`` with W a quantized layer's weight dequantized in forward and again in backward (W is
    frozen: only grad_x = g W is needed), so no float copy of W lives until backward."""

    @staticmethod
    def forward(ctx, x, layer, dtype):
        ctx.layer, ctx.dtype = layer, dtype
        return x @ _as(layer._dequantized(), dtype).t()

    @staticmethod
    @first_order
    def backward(ctx, grad):
        return grad @ _as(ctx.layer._dequantized(), ctx.dtype), None, None


def dequant_linear(layer, x: Tensor) -> Tensor:
    """``x W^T`` (``[..., out]``, x's dtype) for ``layer`` (a :class:`ftkernels.nn.LoRAQuantLinear`) whose
    ``_dequantized()`` gives W ``[out, in]``; plain ops when traced or under ``torch.func``."""
    if torch.compiler.is_compiling() or torch_func.active():
        return x @ _as(layer._dequantized(), x.dtype).t()
    return _DequantLinear.apply(x, layer, x.dtype)
