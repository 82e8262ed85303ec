"""DoRA (Liu et al. 2024, PEFT's ``use_dora=True``) for the LoRA layers (Linear, HF Conv1D, Conv2d).

DoRA splits the adapted weight into a direction and a trained per-output magnitude m ``[out]`` (a
conv's rows are its output channels, norms over ``in, kh, kw``):
``W' = m / ||W + s B A||_row * (W + s B A)``. As in PEFT (and the paper's section 4.3) the row norm
is treated as a constant (no gradient flows through it), so with ``mns = m / ||W + s B A||_row``:

- no dropout (or eval): ``y = mns * (x W^T + s x A^T B^T) + b``: the fused LoRA op (bias-free)
  followed by one per-column scale;
- dropout p in training, PEFT's form: ``y = x W^T + b + (mns - 1) * (D(x) W^T) + mns * s D(x) A^T B^T``
  (the magnitude acts on the dropped input's base term; one more GEMM, as PEFT): the low-rank path is
  the delta node, which keeps x (or its rebuild) rather than D(x), and the sum one node keeping
  ``D(x) W^T`` but not the delta (Linear; convs compose plain ops).

The scale is applied in fp32 and rounded once to the output dtype (mns - 1 is ~1e-3, below bf16's
resolution near 1), as PEFT's fp32 magnitude does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import torch_func
from ..ops._autograd import batched, first_order
from ..ops.lora_dropout import lora_dropout
from ..ops.lora_linear import _as
from ..ops.lora_quant import lora_delta


@torch.no_grad()
def dora_weight_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """``||W + s B A||`` per output row, fp32 (fp64 for fp64 weights), without gradient; W ``[out, in]``,
    A ``[r, in]``, B ``[out, r]``. Expanded as ``||W||^2 + 2 s <B, W A^T> + s^2 <B, B (A A^T)>`` per row,
    so no fp32 copy of W is made (one pass over W for its norms, one GEMM of ``[out, in] x [in, r]``)."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    a, b = lora_a.to(acc), lora_b.to(acc)
    sq = torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()
    wa = (weight @ _as(lora_a, weight.dtype).t()).to(acc)  # [out, r], W's own dtype (no fp32 copy of W)
    sq = sq + 2 * scaling * (b * wa).sum(1) + scaling * scaling * (b * (b @ (a @ a.t()))).sum(1)
    return sq.clamp_min(0).sqrt()


def dora_scale(magnitude: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """``mns = m / ||W + s B A||_row`` ``[out]``: differentiable in m only (the norm is a constant)."""
    wn = dora_weight_norm(weight, lora_a, lora_b, scaling)
    return magnitude.to(wn.dtype) / wn


def _sum_to(t: Tensor, shape) -> Tensor:
    """t summed (fp32 accumulation, fp64 for fp64) down to ``shape``, which broadcasts to t's (right-aligned)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1]
    return t.sum(dims, dtype=acc).reshape(shape) if dims else t.to(acc).reshape(shape)


class _DoraScale(torch.autograd.Function):
    """``y = z * mns + b`` per output column / channel (mns and b shaped to broadcast: ``[out]`` on
    ``[..., out]``, ``[1, out, 1, 1]`` on NCHW), computed in fp32 and written once in z's dtype (one
    pass; a composition with casts took four and saved an fp32 copy of z). Saves z (the LoRA op's own
    output) and mns. Backward: ``g_z = g * mns`` (one pass), ``g_mns`` and ``g_b`` summed in fp32."""

    @staticmethod
    def forward(ctx, z, mns, bias):
        if torch.compiler.is_compiling():  # out= variants stay out of traced graphs; inductor fuses this
            y = (z * mns if bias is None else torch.addcmul(bias, z, mns)).to(z.dtype)
        else:
            y = torch.empty_like(z)
            torch.mul(z, mns, out=y) if bias is None else torch.addcmul(bias, z, mns, out=y)
        ctx.save_for_backward(z, mns)
        ctx.bias_meta = None if bias is None else (bias.dtype, bias.shape)
        return y

    @staticmethod
    def backward(ctx, g):
        z, mns = ctx.saved_tensors
        gz = gm = gb = None
        if ctx.needs_input_grad[0]:
            # traced, under vmap, or create_graph=True (grads of grads: out= is not differentiable): no out=
            plain = torch.compiler.is_compiling() or batched(g) or torch.is_grad_enabled()
            gz = (g * mns).to(z.dtype) if plain else torch.mul(g, mns, out=torch.empty_like(z))
        if ctx.needs_input_grad[1]:
            gm = _sum_to(g * z, mns.shape).to(mns.dtype)
        if ctx.needs_input_grad[2]:
            gb = _sum_to(g, ctx.bias_meta[1]).to(ctx.bias_meta[0])
        return gz, gm, gb


def dora_apply_scale(z: Tensor, mns: Tensor, bias: Tensor | None) -> Tensor:
    """:class:`_DoraScale` (``y = z * mns + b``, fp32 math, z's dtype out); plain ops under a
    ``torch.func`` transform."""
    if torch_func.active():
        return (z * mns if bias is None else torch.addcmul(bias, z, mns)).to(z.dtype)
    return _DoraScale.apply(z, mns, bias)


def dora_linear(lora_fn, x: Tensor, weight: Tensor, bias, lora_a, lora_b, magnitude, scaling: float, p, seed_fn):
    """DoRA's forward (module docstring). ``lora_fn(x, W, bias, A, B, s, p)``: the fused LoRA op;
    ``seed_fn()``: the dropout seed of this call (drawn only when p > 0). x ``[..., in]`` -> ``[..., out]``.
    With dropout, the low-rank path is the delta node (:func:`ftkernels.ops.lora_quant.lora_delta`: x or
    its rebuild kept, not D(x)) and the sum one node (:func:`dora_combine`: t kept, not the delta)."""
    mns = dora_scale(magnitude, weight, lora_a, lora_b, scaling)
    if p == 0:
        z = lora_fn(x, weight, None, lora_a, lora_b, scaling, 0.0)
        return dora_apply_scale(z, mns, bias)
    # The compute dtype: autocast's, else x's (which the base weight must match: checked by the layer).
    dev = x.device.type
    autocast = torch.is_autocast_enabled(dev) and x.dtype != torch.float64
    dtype = torch.get_autocast_dtype(dev) if autocast else x.dtype
    seed = seed_fn()
    d, u = lora_delta(x, lora_a, lora_b, scaling, p, seed, dtype, dtype, with_u=True)
    xd = torch_func.dropped(x, p, seed) if torch_func.active() else lora_dropout(x, p, seed)
    return dora_combine(F.linear(x, weight, bias), F.linear(xd, weight), d, u, lora_b, mns, scaling)


class _DoraCombine(torch.autograd.Function):
    """DoRA's output in PEFT's dropout form (and QDoRA's), ``y + (mns - 1) t + mns d`` (fp32 math, y's dtype
    out) with ``d = s u B_c^T`` (:func:`ftkernels.ops.lora_quant.lora_delta`'s output and its u). Saves t,
    u and mns (and B): the magnitude's gradient needs ``sum_rows(g (t + d))``, and its d part is
    ``s * rowsum(B_c * (g^T u))``, so d itself (``[M, N]``, fp32 in the composition) is not kept."""

    @staticmethod
    def forward(ctx, y, t, d, u, lora_b, mns, scaling):
        out = _dora_sum(y, t, d, mns)
        ctx.save_for_backward(t, u, lora_b, mns)
        ctx.scaling, ctx.dtypes = scaling, (y.dtype, t.dtype, d.dtype)
        return out

    @staticmethod
    @first_order
    def backward(ctx, g):
        t, u, lora_b, mns = ctx.saved_tensors
        acc = mns.dtype
        g32 = g.to(acc)
        grad_y = g.to(ctx.dtypes[0])
        grad_t = ((mns - 1) * g32).to(ctx.dtypes[1])
        grad_d = (mns * g32).to(ctx.dtypes[2])
        g2 = g32.reshape(-1, g.shape[-1])
        gu = _as(g2, u.dtype).t() @ u  # [N, r]
        grad_m = (g2 * t.reshape(-1, g.shape[-1]).to(acc)).sum(0) + ctx.scaling * (_as(lora_b, u.dtype) * gu).sum(1).to(
            acc
        )
        return grad_y, grad_t, grad_d, None, None, grad_m, None


def dora_combine(y: Tensor, t: Tensor, d: Tensor, u: Tensor, lora_b: Tensor, mns: Tensor, scaling: float) -> Tensor:
    """``y + (mns - 1) t + mns d`` in fp32, rounded to y's dtype (y, t, d ``[..., N]``, mns ``[N]`` broadcast over
    rows, ``d = s u B^T``), through :class:`_DoraCombine` in eager mode; plain ops when traced or under
    ``torch.func``."""
    if torch.compiler.is_compiling() or torch_func.active():
        return _dora_sum(y, t, d, mns)
    return _DoraCombine.apply(y, t, d, u, lora_b, mns, scaling)


def _dora_sum(y: Tensor, t: Tensor, d: Tensor, mns: Tensor, scale: float = 1.0) -> Tensor:
    """``y + (mns - 1) t + (mns scale) d`` in mns's dtype (fp32), rounded to y's."""
    acc = mns.dtype
    return (y.to(acc) + (mns - 1) * t.to(acc) + (mns * scale) * d.to(acc)).to(y.dtype)


def dora_dropout_form(base: Tensor, t: Tensor, lora: Tensor, mns: Tensor, scaling: float) -> Tensor:
    """PEFT's DoRA output with dropout on: ``base + (mns - 1) * t + mns * s * lora`` in fp32, in base's
    dtype; base = the base layer on x (bias included), t = its weight on D(x) (no bias), lora = the
    unscaled low-rank path on D(x); mns broadcast over the output channels."""
    return _dora_sum(base, t, lora, mns, scaling)
