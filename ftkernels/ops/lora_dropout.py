"""``ftkernels::lora_dropout(x, dropout, seed) -> Tensor``: the LoRA dropout stream applied to a tensor.

``D(x)[..., k] = x[..., k] / (1 - p)`` where the Philox stream of ``seed`` keeps element (row, k) of
x's logical ``[numel / K, K]`` view, else 0 (``csrc/include/ftk/lora.h``; the same bits as the fused
LoRA Linear's in-kernel mask). Any memory format (the mask follows logical indices). D is linear
and its own adjoint, so backward is ``D(grad)`` with the same seed: nothing is saved.
Used where the low-rank path is an ATen op (LoRA convolutions), so the dropped copy exists only
while that op runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._ext import C, ExtensionError
from ._autograd import batched


def _impl(x: Tensor, dropout: float, seed: Tensor) -> Tensor:
    if x.device.type == "cpu":
        return C().lora_dropout_cpu(x, dropout, int(seed))
    if x.device.type == "cuda":
        from ..triton import lora_dropout as tk

        return tk.lora_dropout(x, dropout, seed)
    raise ExtensionError(f"ftkernels lora_dropout has no kernel for device {x.device} (cpu and cuda are served)")


@torch.library.custom_op("ftkernels::lora_dropout", mutates_args=())
def lora_dropout(x: Tensor, dropout: float, seed: Tensor) -> Tensor:
    return _impl(x, dropout, seed)


def lora_dropout_nograd(x: Tensor, dropout: float, seed: Tensor) -> Tensor:
    """``D(x)`` inside an autograd.Function's forward or backward (no autograd wanted): the kernel
    called directly in eager mode (a custom op's dispatch costs more host time than a small
    kernel), the custom op when ``torch.compile`` traces; for a batched x (a backward under vmap) a multiply
    by the mask of x's logical shape, since no kernel takes batched tensors."""
    if torch.compiler.is_compiling():
        return lora_dropout(x, dropout, seed)
    if batched(x):
        return x * _impl(torch.ones(x.shape, dtype=x.dtype, device=x.device), dropout, seed)
    return _impl(x, dropout, seed)


@lora_dropout.register_fake
def _fake(x, dropout, seed):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    _, dropout, seed = inputs
    ctx.save_for_backward(seed)
    ctx.dropout = dropout


def _backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return lora_dropout(grad, ctx.dropout, seed), None, None


torch.library.register_autograd("ftkernels::lora_dropout", _backward, setup_context=_setup_context)


def _vmap(info, in_dims, x, dropout, seed):
    """vmap: each sample's stream over its own shape (``torch.func`` transforms; see :mod:`.torch_func`).
    One seed for all (``randomness="same"``): one mask, broadcast; a batched seed (``"different"``):
    one call per sample."""
    x_dim, _, seed_dim = in_dims
    n = info.batch_size
    xb = x.movedim(x_dim, 0) if x_dim is not None else x.expand(n, *x.shape)
    if seed_dim is None:
        return xb * lora_dropout(torch.ones(xb.shape[1:], dtype=x.dtype, device=x.device), dropout, seed), 0
    seeds = seed.movedim(seed_dim, 0)
    return torch.stack([lora_dropout(xb[i], dropout, seeds[i]) for i in range(n)]), 0


torch.library.register_vmap("ftkernels::lora_dropout", _vmap)
