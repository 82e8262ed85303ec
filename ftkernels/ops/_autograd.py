"""Autograd helpers shared by the ops' eager ``autograd.Function`` nodes."""

from __future__ import annotations

import functools

import torch


def unviewed(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of its own (the same memory, not marked a view). Autograd refuses in-place ops
    (``h += residual``, an in-place activation) on a custom Function's output that is a view of a tensor
    made inside it; the buffer the kernel wrote never escapes, so nothing else sees the memory."""
    if not t._is_view():
        return t
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def first_order(backward):
    """``torch.autograd.function.once_differentiable`` for a ``backward(ctx, *grads)``, minus its cost
    in the common case. once_differentiable runs backward under ``torch.no_grad()`` and, when grad mode
    is on (``create_graph=True``), marks the results so that differentiating them again raises. Grad mode
    is off in every other backward already, so the no_grad context is skipped then: 10-25 us less
    host time per node and step on a slow 2-core host, 2-6% of a small LoRA layer's fwd+bwd there
    (bench/NOTES.md "Session 9"). With ``create_graph=True`` the wrapped once_differentiable runs, so
    the semantics are the same."""
    once = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            return once(ctx, *grads)
        return backward(ctx, *grads)

    return wrapper
