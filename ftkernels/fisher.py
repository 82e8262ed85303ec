"""Diagonal Fisher information for EWC and Fisher-based masks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def _default_loss(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, dict):  # Hugging Face style: labels in the batch, loss on the output
        out = model(**batch)
        loss = out["loss"] if isinstance(out, dict) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError("fisher_diagonal: the model returned no loss for a dict batch; pass loss_fn")
        return loss
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
) -> dict[nn.Parameter, torch.Tensor]:
    r"""Empirical diagonal Fisher of the trainable params: :math:`F = \frac1B\sum_b (\nabla_\theta L_b)^2`.

    Args:
      model: the model; only params with ``requires_grad`` are measured.
      batches: iterable of batches (each one backward pass).
      loss_fn: ``loss_fn(model, batch) -> scalar loss``. Default: ``model(**batch).loss`` for dict
        batches, ``cross_entropy(model(x), y)`` for ``(x, y)`` batches.

    Returns ``{param: F}`` with ``F`` of the param's shape, dtype and device (fp32 accumulation),
    ready for ``FusedAdamW(..., ewc=lam, fisher=F)``. The model's existing ``.grad`` are restored.
    """
    loss_fn = loss_fn or _default_loss
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fisher_diagonal: the model has no trainable parameters")
    saved = [p.grad for p in params]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    n = 0
    try:
        for batch in batches:
            for p in params:
                p.grad = None
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(
                    f"fisher_diagonal: loss_fn must return a one-element tensor that requires grad, got {got}"
                    f" on batch {n}"
                )
            if not torch.isfinite(loss.detach()).all():
                raise ValueError(f"fisher_diagonal: non-finite loss {float(loss.detach())} on batch {n}")
            loss.backward()
            for a, p in zip(acc, params):
                if p.grad is not None:
                    a.add_(p.grad.float().square())
            n += 1
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    if n == 0:
        raise ValueError("fisher_diagonal: batches was empty")
    return {p: (a / n).to(p.dtype) for p, a in zip(params, acc)}
