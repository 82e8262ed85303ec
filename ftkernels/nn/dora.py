"""DoRA (Liu et al. 2024, PEFT's ``use_dora=True``) for the LoRA Linear layers: the math.

DoRA splits the adapted weight into a direction and a trained per-output magnitude m ``[out]``:
``W' = m / ||W + s B A||_row * (W + s B A)``. As in PEFT (and the paper's section 4.3) the row norm
is treated as a constant (no gradient flows through it), so with ``mns = m / ||W + s B A||_row``:

- no dropout (or eval): ``y = mns * (x W^T + s D(x) A^T B^T) + b`` with D = identity: the fused LoRA
  op (bias-free) followed by one per-column scale;
- dropout p in training, PEFT's form: ``y = x W^T + b + (mns - 1) * (D(x) W^T) + mns * s D(x) A^T B^T``
  (the magnitude acts on the dropped input's base term), a plain composition (one more GEMM, as PEFT).

The scale is applied in fp32 and rounded once to the output dtype (mns - 1 is ~1e-3, below bf16's
resolution near 1), as PEFT's fp32 magnitude does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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


class _DoraScale(torch.autograd.Function):
    """``y = z * mns + b`` per output column, computed in fp32 and written once in z's dtype (one pass;
    the composition with casts took four and saved an fp32 copy of z). Saves z (the LoRA op's own
    output) and mns. Backward: ``g_z = g * mns`` (one pass), ``g_mns = sum_rows(g * z)`` and
    ``g_b = sum_rows(g)``, summed in fp32."""

    @staticmethod
    def forward(ctx, z, mns, bias):
        if torch.compiler.is_compiling():  # out= variants stay out of traced graphs; inductor fuses this
            y = (z * mns if bias is None else torch.addcmul(bias, z, mns)).to(z.dtype)
        else:
            y = torch.empty_like(z)
            torch.mul(z, mns, out=y) if bias is None else torch.addcmul(bias, z, mns, out=y)
        ctx.save_for_backward(z, mns)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        z, mns = ctx.saved_tensors
        gz = gm = gb = None
        if ctx.needs_input_grad[0]:
            gz = (g * mns).to(z.dtype) if torch.compiler.is_compiling() else torch.mul(g, mns, out=torch.empty_like(z))
        n = z.shape[-1]
        if ctx.needs_input_grad[1]:
            gm = (g * z).reshape(-1, n).sum(0, dtype=torch.float32).to(mns.dtype)
        if ctx.needs_input_grad[2]:
            gb = g.reshape(-1, n).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return gz, gm, gb


def dora_linear(lora_fn, x: Tensor, weight: Tensor, bias, lora_a, lora_b, magnitude, scaling: float, p, seed_fn):
    """DoRA's forward (module docstring). ``lora_fn(x, W, bias, A, B, s, p)``: the fused LoRA op;
    ``seed_fn()``: the dropout seed of this call (drawn only when p > 0). x ``[..., in]`` -> ``[..., out]``."""
    mns = dora_scale(magnitude, weight, lora_a, lora_b, scaling)
    if p == 0:
        z = lora_fn(x, weight, None, lora_a, lora_b, scaling, 0.0)
        return _DoraScale.apply(z, mns, bias)
    # Adapters in the compute dtype (autocast casts inside F.linear anyway; otherwise x's dtype, which
    # the base weight must match: checked by the layer).
    autocast = torch.is_autocast_enabled(x.device.type)
    a, b = (lora_a, lora_b) if autocast else (_as(lora_a, x.dtype), _as(lora_b, x.dtype))
    xd = lora_dropout(x, p, seed_fn())
    z = F.linear(x, weight)
    t = F.linear(xd, weight)
    lora = F.linear(F.linear(xd, a), b)
    y = z.to(mns.dtype) + (mns - 1) * t.to(mns.dtype) + (mns * scaling) * lora.to(mns.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(z.dtype)
