"""The layers under ``torch.func`` transforms (grad, vmap, vjp, jvp, jacrev/jacfwd, hessian),
forward-mode AD (``torch.autograd.forward_ad``) and :func:`plain_ops` (double backward).

Our autograd nodes cannot run inside a transform: torch refuses the C++ node outright, and a Python
``autograd.Function`` would need a vmap rule and a forward-mode formula for each transform. So while a
transform is active each layer computes the same math with plain torch ops, which functorch
differentiates (to any order, forward mode included) and batches itself, as it does PEFT's layers. A
transform's result equals the fused path's.

Dropout keeps its Philox stream: the mask of a call is ``lora_dropout`` of ones of x's logical shape
with the call's seed (x itself only meets a multiply). Under ``vmap`` that shape is one sample's, so
with ``randomness="same"`` every sample gets the mask a lone call on it would get, with
``"different"`` each sample draws its own seed, and ``"error"`` (vmap's default) raises at the seed's
draw, as torch's dropout does.
"""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as _fwad
import torch.nn.functional as F
from torch import Tensor

from .lora_dropout import lora_dropout

_peek = torch._C._functorch.peek_interpreter_stack


_plain_depth = 0  # > 0 inside plain_ops()


def active() -> bool:
    """Whether layers compute in plain torch ops now: inside :func:`plain_ops`, a ``torch.func``
    transform, or a forward-AD dual level (checked on every layer call: 0.28 us on a 2-core VM). Never
    while ``torch.compile`` traces: Dynamo reads both transform checks as true in any graph, and traced
    graphs take the custom ops."""
    if torch.compiler.is_compiling():
        return False
    return _plain_depth > 0 or _peek() is not None or _fwad._current_level >= 0


@contextlib.contextmanager
def plain_ops():
    """Inside it, every ftkernels layer computes its forward with plain torch ops (the same math and
    dropout masks as the fused path) instead of its fused autograd node. The fused nodes are first-order
    only (their backward is not differentiable), so this is the way to double backward:
    ``torch.autograd.grad(..., create_graph=True)`` for a gradient penalty or a second-order method
    on the graph of a forward run inside it. Slower and heavier than the fused path; code that
    ``torch.compile`` traces keeps the custom ops (first-order) regardless.

    Example::

        with ftk.plain_ops():
            loss = loss_fn(model(x), y)
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + gx.square().sum()).backward()
    """
    global _plain_depth
    _plain_depth += 1
    try:
        yield
    finally:
        _plain_depth -= 1


def keep_scale(x: Tensor, p: float, seed: Tensor) -> Tensor:
    """The LoRA dropout multiplier over x's logical shape: ``1/(1-p)`` where the stream of ``seed``
    keeps the element, 0 elsewhere (x's dtype and device)."""
    return lora_dropout(torch.ones(x.shape, dtype=x.dtype, device=x.device), p, seed)


def dropped(x: Tensor, p: float, seed: Tensor) -> Tensor:
    """``D(x)``: x times :func:`keep_scale` (x itself when p is 0)."""
    return x if p == 0 else x * keep_scale(x, p, seed)


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float, p: float, seed) -> Tensor:
    """``x W^T + b + s (D(x) A^T) B^T`` (``ftkernels::lora_linear_fwd``'s y), adapters cast to x's dtype."""
    a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(dropped(x, p, seed), a), b)


def lora_linear_bwd(g, x, weight, a, b, u, scaling: float, p: float, seed, need_x: bool, acc=None):
    """``ftkernels::lora_linear_bwd``'s ``(grad_x or empty, grad_A, grad_B)`` in plain ops, for a backward
    run under vmap (:func:`ftkernels.ops._autograd.batched`), where the kernels cannot run: ``v = s g B``,
    ``grad_B = s g^T u``, ``grad_A = v^T D(x)``, ``grad_x = g W + D(v A)`` (plus ``acc``). A and B in x's dtype."""
    v = scaling * (g @ b)
    gb = scaling * (g.t() @ u)
    ga = v.t() @ dropped(x, p, seed)
    if not need_x:
        return x.new_empty((0,)), ga, gb
    gx = g @ weight + dropped(v @ a, p, seed)
    return (gx if acc is None else acc + gx), ga, gb


def lora_conv(conv, x, weight, bias, lora_a, lora_b, scaling: float, p: float, seed, geom) -> Tensor:
    """``conv(x, W, b) + s conv_B(conv_A(D(x)))`` (the unmerged LoRA conv node's y); ``conv``:
    ``F.conv1d`` / ``conv2d`` / ``conv3d``; geom ``(stride, padding, dilation, groups)``: A takes all
    but the groups, B (1x1) only the groups."""
    stride, padding, dilation, groups = geom
    u = conv(dropped(x, p, seed), lora_a.to(x.dtype), None, stride, padding, dilation)
    return conv(x, weight, bias, stride, padding, dilation, groups) + scaling * conv(
        u, lora_b.to(x.dtype), groups=groups
    )


def loreft(h: Tensor, rot: Tensor, w: Tensor, b: Tensor, p: float, seed) -> Tensor:
    """``D(h + s R)`` with ``s = h (W - R)^T + b`` in fp32 (fp64 for fp64 h), out in h's dtype
    (``ftkernels::loreft_fwd``'s out)."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    ha, ra = h.to(acc), rot.to(acc)
    s = ha @ (w.to(acc) - ra).t() + b.to(acc)
    return dropped((ha + s @ ra).to(h.dtype), p, seed)


def loreft_bwd(g: Tensor, h: Tensor, rot: Tensor, w: Tensor, s: Tensor, p: float, seed):
    """``ftkernels::loreft_bwd``'s ``(grad_h, grad_R, grad_W, grad_b)`` in plain ops, for a backward run
    under vmap (see :func:`lora_linear_bwd`): with ``gd = D(g)``, ``t = gd R^T``: ``grad_h = gd + t (W - R)``,
    ``grad_W = t^T h``, ``grad_b = sum_rows t``, ``grad_R = s^T gd - t^T h``; math in s's dtype (fp32, fp64
    for fp64 h), grads in h's and R's dtypes."""
    acc = s.dtype
    gd = dropped(g, p, seed).to(acc)
    ra, ha = rot.to(acc), h.to(acc)
    t = gd @ ra.t()
    gh = (gd + t @ (w.to(acc) - ra)).to(h.dtype)
    gr = (s.t() @ gd - t.t() @ ha).to(rot.dtype)
    return gh, gr, (t.t() @ ha).to(rot.dtype), t.sum(0).to(rot.dtype)


def masked_param(t: Tensor, mask: Tensor) -> Tensor:
    """t with its gradient kept only where ``mask`` is True (the value is t's): a masked layer's
    weight gradient is the dense one times the mask."""
    return torch.where(mask, t, t.detach())
