"""``torch.library`` custom ops of the fused LoReFT intervention, over the CPU C++ kernel and the Triton kernels.

``ftkernels::loreft_fwd(h, rot, w, b, dropout, seed) -> (out, s)``
    ``s = h (W - R)^T + b`` (``[M, r]``, fp32; fp64 for fp64 h), ``out = D(h + s R)`` (``[M, d]``, h's dtype).
``ftkernels::loreft_bwd(grad, h, rot, w, s, dropout, seed) -> (grad_h, grad_rot, grad_w, grad_b)``
    With ``gd = D(g)`` and ``t = gd R^T``: ``grad_h = gd + t (W - R)``, ``grad_W = t^T h``,
    ``grad_b = sum_rows t``, ``grad_R = s^T gd - t^T h``.

h is ``[M, d]``; R and W ``[r, d]``, b ``[r]``, of one floating dtype that may differ from h's (fp32
parameters on bf16 hidden states: converted inside, grads returned in their dtype). D is the LoRA
dropout stream over ``[M, d]`` (``csrc/include/ftk/lora.h``), regenerated in backward from the int64
``seed`` tensor. This is LoReFT ``h + R^T (W h + b - R h)`` (Wu et al. 2024) with pyreft's dropout
on the intervention's output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._ext import C, ExtensionError
from . import torch_func
from ._autograd import batched, first_order, unviewed
from .lora_linear import _no_autocast


def _no_kernel(device) -> ExtensionError:
    return ExtensionError(f"ftkernels loreft has no kernel for device {device} (cpu and cuda are served)")


def _acc(h: Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _fwd_impl(h, rot, w, b, dropout, seed):
    if h.device.type == "cpu":
        return C().loreft_fwd_cpu(h, rot, w, b.to(rot.dtype), dropout, int(seed))
    if h.device.type == "cuda":
        from ..triton import loreft as tk

        return tk.forward(h, rot, w, b, dropout, seed)
    raise _no_kernel(h.device)


def _bwd_impl(grad, h, rot, w, s, dropout, seed):
    if batched(grad):  # a backward under vmap: no kernel takes batched tensors
        return torch_func.loreft_bwd(grad, h, rot, w, s, dropout, seed)
    grad = grad.contiguous()
    if h.device.type == "cpu":
        return C().loreft_bwd_cpu(grad, h, rot, w, s, dropout, int(seed))
    if h.device.type == "cuda":
        from ..triton import loreft as tk

        gh, gr, gw, gb = tk.backward(grad, h, rot, w, s, dropout, seed)
        return gh, gr.to(rot.dtype), gw.to(rot.dtype), gb.to(rot.dtype)
    raise _no_kernel(h.device)


@torch.library.custom_op("ftkernels::loreft_fwd", mutates_args=())
def loreft_fwd(h: Tensor, rot: Tensor, w: Tensor, b: Tensor, dropout: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    return _fwd_impl(h, rot, w, b, dropout, seed)


@torch.library.custom_op("ftkernels::loreft_bwd", mutates_args=())
def loreft_bwd(
    grad: Tensor, h: Tensor, rot: Tensor, w: Tensor, s: Tensor, dropout: float, seed: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _bwd_impl(grad, h, rot, w, s, dropout, seed)


@loreft_fwd.register_fake
def _fwd_fake(h, rot, w, b, dropout, seed):
    return h.new_empty(h.shape), h.new_empty((h.shape[0], rot.shape[0]), dtype=_acc(h))


@loreft_bwd.register_fake
def _bwd_fake(grad, h, rot, w, s, dropout, seed):
    return h.new_empty(h.shape), rot.new_empty(rot.shape), rot.new_empty(rot.shape), rot.new_empty((rot.shape[0],))


def _grads(ctx, grad_out, bwd):
    h, rot, w, s, seed = ctx.saved_tensors
    gh, gr, gw, gb = bwd(grad_out, h, rot, w, s, ctx.dropout, seed)
    need_h, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    return (
        gh if need_h else None,
        gr if need_r else None,
        gw if need_w else None,
        gb.to(ctx.b_dtype) if need_b else None,
        None,
        None,
    )


def _save(ctx, h, rot, w, b, s, seed, dropout):
    # h is the caller's own activation; s is M x r: nothing else of size M x d is kept.
    ctx.save_for_backward(h, rot, w, s, seed)
    ctx.dropout, ctx.b_dtype = dropout, b.dtype


def _setup_context(ctx, inputs, output):
    h, rot, w, b, dropout, seed = inputs
    _save(ctx, h, rot, w, b, output[1], seed, dropout)
    ctx.mark_non_differentiable(output[1])


torch.library.register_autograd(
    "ftkernels::loreft_fwd", lambda ctx, g, _gs: _grads(ctx, g, loreft_bwd), setup_context=_setup_context
)


class LoReFTFunction(torch.autograd.Function):
    """Eager-mode autograd node over the same kernels as the custom ops (less host time than a
    custom op's dispatch), for h of any leading shape."""

    @staticmethod
    def forward(ctx, h, rot, w, b, dropout, seed):
        h2 = h.reshape(-1, h.shape[-1])
        with _no_autocast(h):
            out, s = _fwd_impl(h2, rot, w, b, dropout, seed)
        _save(ctx, h2, rot, w, b, s, seed, dropout)
        ctx.h_shape = h.shape
        return unviewed(out.view(h.shape))  # in-place ops on it must work (see unviewed)

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        with _no_autocast(grad_out):
            grads = _grads(ctx, grad_out.reshape(-1, grad_out.shape[-1]), _bwd_impl)
        gh = grads[0]
        return (gh.view(ctx.h_shape) if gh is not None else None, *grads[1:])


def loreft_apply(h: Tensor, rot: Tensor, w: Tensor, b: Tensor, dropout: float, seed: Tensor) -> Tensor:
    """``D(h + R^T (W h + b - R h))`` over the last dim of h ``[..., d]`` with autograd: the custom op
    when ``torch.compile`` traces, plain ops inside a ``torch.func`` transform, :class:`LoReFTFunction`
    otherwise."""
    if torch.compiler.is_compiling():
        return loreft_fwd(h.reshape(-1, h.shape[-1]), rot, w, b, dropout, seed)[0].view(h.shape)
    if torch_func.active():  # no autograd node runs under a torch.func transform: plain ops
        return torch_func.loreft(h, rot, w, b, dropout, seed)
    return LoReFTFunction.apply(h, rot, w, b, dropout, seed)
