"""Fused LoRA Linear layers that read one input (q/k/v projections; gate/up of a gated MLP) as one
autograd node: :class:`LoRAGroupFunction`.

For members ``i = 1..G`` with frozen ``W_i`` ``[N_i, K]``, bias ``b_i``, adapters ``A_i`` ``[r_i, K]``,
``B_i`` ``[N_i, r_i]``, scaling ``s_i``, dropout ``p_i`` and seed ``seed_i`` on the shared x ``[..., K]``:

    ``y_i = x W_i^T + b_i + s_i (D_i(x) A_i^T) B_i^T``                      (each member's own mask)
    ``grad_x = sum_i (g_i W_i + D_i'(s_i g_i B_i A_i))``     accumulated in one buffer, in place

Each member runs the same kernels as :mod:`ftkernels.ops.lora_linear` (bit-identical outputs and
adapter grads). What the group saves is host and memory traffic: one autograd node instead of G,
no per-member grad_x buffer, and no autograd sum of G grad_x tensors (G-1 passes over x's size).
Outputs whose grad never arrives (unused) cost nothing in backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import first_order, unviewed
from .lora_linear import (
    _as,
    _bwd_impl,
    _fwd_impl,
    _no_autocast,
    layer_grads,
    node_serves,
    node_ys,
    save_x,
    saved_with_x,
)

_PER = 5  # flat inputs per member: weight, bias, lora_a, lora_b, seed


class LoRAGroupFunction(torch.autograd.Function):
    """``LoRAGroupFunction.apply(x, scalings, dropouts, *flat)`` -> ``(y_1, ..., y_G)``, with ``flat``
    the members' ``(weight, bias or None, lora_a, lora_b, seed)`` in order. x, the weights and the
    biases share the compute dtype; the adapters may have another (cast inside, grads returned in
    their dtype). ``scalings``/``dropouts``: tuples of G floats (dropout already 0 in eval)."""

    @staticmethod
    def forward(ctx, x, scalings, dropouts, *flat):
        flat_x = x.dim() != 2
        x2 = x.reshape(-1, x.shape[-1]) if flat_x else x
        ys, saved, dtypes = [], [], []
        with _no_autocast(x):
            for i in range(len(scalings)):
                w, bias, a, b, seed = flat[_PER * i : _PER * (i + 1)]
                dtypes.append((a.dtype, b.dtype))
                a, b = _as(a, x.dtype), _as(b, x.dtype)  # cast once: backward reuses the r-row copies
                y, u = _fwd_impl(x2, w, bias, a, b, scalings[i], dropouts[i], seed)
                ys.append(unviewed(y.view(*x.shape[:-1], y.shape[-1])) if flat_x else y)
                saved += [w, a, b, u, seed]
        save_x(ctx, x2, x, *saved)  # x itself, or what its producer keeps to rebuild it
        ctx.scalings, ctx.dropouts, ctx.adapter_dtypes = scalings, dropouts, dtypes
        ctx.x_shape = x.shape if flat_x else None
        ctx.set_materialize_grads(False)  # an unused output's grad stays None: its member is skipped
        return tuple(ys)

    @staticmethod
    @first_order
    def backward(ctx, *grad_ys):
        x2, *saved = saved_with_x(ctx)
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * (3 + _PER * len(grad_ys))
        gx = None
        with _no_autocast(x2):
            for i, g in enumerate(grad_ys):
                if g is None:
                    continue
                first = 3 + _PER * i  # this member's weight in the inputs
                mine = (x2, *saved[_PER * i : _PER * (i + 1)])
                needs = (need[0], *need[first : first + 4])
                gxi, *member = layer_grads(
                    g.reshape(-1, g.shape[-1]), mine, ctx.scalings[i], ctx.dropouts[i], ctx.adapter_dtypes[i],
                    needs, _bwd_impl, grad_x_acc=gx,
                )  # fmt: skip
                grads[first : first + 4] = member  # grad of W, bias, A, B
                if gxi is not None:
                    gx = gxi  # the first member's buffer; later members add into it
        if gx is not None and ctx.x_shape is not None:
            gx = gx.view(ctx.x_shape)
        grads[0] = gx
        return tuple(grads)


def lora_group_ys(x: Tensor, members: list[tuple], scalings: tuple, dropouts: tuple) -> tuple[Tensor, ...]:
    """``(y_1, ..., y_G)`` of G fused LoRA Linear layers on one x ``[..., K]`` (math in the module
    docstring), one autograd node. ``members``: ``(weight [N_i, K], bias [N_i] or None, lora_a [r_i, K],
    lora_b [N_i, r_i], seed)`` per member, already in the compute dtype (adapters excepted), ``seed`` an
    int64 scalar tensor on x's device; ``scalings``/``dropouts``: G floats. Runs as the C++ node where
    it serves the call (:func:`ftkernels.ops.lora_linear.node_serves`), else as :class:`LoRAGroupFunction`."""
    if node_serves(x, dropouts):
        return tuple(node_ys(x, members, scalings, dropouts))
    flat = [t for m in members for t in m]
    return LoRAGroupFunction.apply(x, tuple(scalings), tuple(dropouts), *flat)
