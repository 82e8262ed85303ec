"""DoRA (Liu et al. 2024, PEFT's ``use_dora=True``) for the LoRA layers (Linear, HF Conv1D, Conv2d).

DoRA splits the adapted weight into a direction and a trained per-output magnitude m ``[out]`` (a
conv's rows are its output channels, norms over ``in, kh, kw``):
``W' = m / ||W + s B A||_row * (W + s B A)``. As in PEFT (and the paper's section 4.3) the row norm
is treated as a constant (no gradient flows through it), so with ``mns = m / ||W + s B A||_row``:

- no dropout (or eval): ``y = mns * (x W^T + s x A^T B^T) + b``: the fused LoRA op (bias-free)
  followed by one per-column scale;
- dropout p in training, PEFT's form: ``y = x W^T + b + (mns - 1) * (D(x) W^T) + mns * s D(x) A^T B^T``
  (the magnitude acts on the dropped input's base term), a plain composition (one more GEMM, as PEFT).

The scale is applied in fp32 and rounded once to the output dtype (mns - 1 is ~1e-3, below bf16's
resolution near 1), as PEFT's fp32 magnitude does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import torch_func
from ..ops._autograd import batched
from ..ops.lora_dropout import lora_dropout
from ..ops.lora_linear import _as


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
    ``seed_fn()``: the dropout seed of this call (drawn only when p > 0). x ``[..., in]`` -> ``[..., out]``."""
    mns = dora_scale(magnitude, weight, lora_a, lora_b, scaling)
    if p == 0:
        z = lora_fn(x, weight, None, lora_a, lora_b, scaling, 0.0)
        return dora_apply_scale(z, mns, bias)
    # Adapters in the compute dtype (autocast casts inside F.linear anyway; otherwise x's dtype, which
    # the base weight must match: checked by the layer).
    autocast = torch.is_autocast_enabled(x.device.type)
    a, b = (lora_a, lora_b) if autocast else (_as(lora_a, x.dtype), _as(lora_b, x.dtype))
    xd = torch_func.dropped(x, p, seed_fn()) if torch_func.active() else lora_dropout(x, p, seed_fn())
    return dora_dropout_form(
        F.linear(x, weight, bias), F.linear(xd, weight), F.linear(F.linear(xd, a), b), mns, scaling
    )


def dora_dropout_form(base: Tensor, t: Tensor, lora: Tensor, mns: Tensor, scaling: float) -> Tensor:
    """PEFT's DoRA output with dropout on: ``base + (mns - 1) * t + mns * s * lora`` in fp32, in base's
    dtype; base = the base layer on x (bias included), t = its weight on D(x) (no bias), lora = the
    unscaled low-rank path on D(x); mns broadcast over the output channels."""
    y = base.to(mns.dtype) + (mns - 1) * t.to(mns.dtype) + (mns * scaling) * lora.to(mns.dtype)
    return y.to(base.dtype)
