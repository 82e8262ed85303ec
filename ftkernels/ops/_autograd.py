"""Autograd helpers shared by the ops' eager ``autograd.Function`` nodes."""

from __future__ import annotations

import functools

import torch

_IS_BATCHED = torch._C._functorch.is_batchedtensor
_IS_LEGACY_BATCHED = torch._C._functorch.is_legacy_batchedtensor


def batched(t: torch.Tensor) -> bool:
    """Whether t is a vmap-batched tensor: a backward run under vmap (``autograd.grad(is_grads_batched=True)``
    and ``jacobian(vectorize=True)`` use the legacy vmap, ``torch.func.vmap`` over ``autograd.grad`` the
    functorch one) hands nodes such grads, on which out= ops and the kernels cannot run."""
    return _IS_LEGACY_BATCHED(t) or _IS_BATCHED(t)


def unviewed(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of its own (the same memory, not marked a view). Autograd refuses in-place ops
    (``h += residual``, an in-place activation) on a custom Function's output that is a view of a tensor
    made inside it; the buffer the kernel wrote never escapes, so nothing else sees the memory."""
    if not t._is_view():
        return t
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


TWICE = (
    "ftkernels: trying to differentiate twice through a fused node (its backward is first-order); run the"
    " forward inside `with ftkernels.plain_ops():` for grads of grads"
)


def first_order(backward):
    """``torch.autograd.function.once_differentiable`` for a ``backward(ctx, *grads)``, minus its cost
    in the common case, and with an error that names the way out. once_differentiable runs backward
    under ``torch.no_grad()`` and, when grad mode is on (``create_graph=True``), marks the results so
    that differentiating them again raises. Grad mode is off in every other backward already, so the
    no_grad context is skipped then: 10-25 us less host time per node and step on a slow 2-core host,
    2-6% of a small LoRA layer's fwd+bwd there (bench/NOTES.md "Session 9")."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads):
            return outputs
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        # Each result aliased through a node whose backward raises (as once_differentiable does). The
        # node also takes the incoming grads (their graph leads to x and to the layers above) and the
        # saved tensors that require grad (A, B, ...): once_differentiable's node leads nowhere, so
        # grads of grads w.r.t. those were "not used in the graph", a silent None with allow_unused=True;
        # through these edges they reach the node and raise.
        extras = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
        err = torch._C._functions.DelayedError(TWICE.encode(), len(outs) + len(extras))
        marked = err(*[None if t is None else t.detach().requires_grad_(True) for t in outs], *extras)
        marked = marked if isinstance(marked, tuple) else (marked,)
        return marked[: len(outs)] if isinstance(outputs, tuple) else marked[0]

    return wrapper
