"""Opacus (DP-SGD) per-sample gradients for the fused LoRA layers.

Opacus's ``GradSampleModule`` (and ``PrivacyEngine.make_private``) needs each trainable parameter's
gradient per example. For a layer type it has no rule for, it reruns the layer under
``torch.func.vmap``; our layers support that (:mod:`ftkernels.ops.torch_func`), so LoRA without
dropout works with nothing registered. LoRA dropout cannot be redrawn that way: the mask of a call
comes from the Philox stream of a seed over the whole batch, and vmap refuses random draws.

So when a layer sees Opacus's activation hook on itself (it registers one on every trainable module),
it registers the rules below with Opacus (once) and, for each call with dropout, keeps the call's
seed on a stack that the rule pops (Opacus pops activations the same way, last call first). For
``LoRALinear`` / ``LoRAConv1D`` the rule regenerates ``D(x)`` from x and the seed (the same bits as
the forward's) and computes, per example n (``g`` the output gradient, ``s`` the scaling)::

    u = D(x) A^T                 grad B[n] = s sum_t g[n,t]^T u[n,t]           [out, r]
    h = g B                      grad A[n] = s sum_t h[n,t]^T D(x)[n,t]        [r, in]

(``grad lora_bias[n] = s sum_t g[n,t]`` for a LoRA bias, and the plain Linear rule for a base
weight or bias left trainable). The LoRA convs and DoRA keep
vmap's rule without dropout and raise a clear error with it; LoRAMultiheadAttention raises (Opacus
keeps positional inputs only, and its masks come by keyword: use Opacus's DPMultiheadAttention), and so
do LoRAParams (its adapter modules, which Opacus hooks, are never called) and quantized bases. Opacus must run with
``batch_first=True`` (its default): the mask follows x's layout as the layer saw it.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_HOOK_NAME = "capture_activations_hook"  # GradSampleModule's forward hook (a bound method)
_registered = [False]


def hooked(module: nn.Module) -> bool:
    """Whether Opacus captures ``module``'s activations (its forward hook is on the module); registers
    the rules of this module with Opacus the first time. Cheap when the module has no forward hook."""
    hooks = module._forward_hooks
    if not hooks or not any(
        getattr(h, "__name__", None) == _HOOK_NAME and getattr(getattr(h, "__self__", None), "hooks_enabled", True)
        for h in hooks.values()
    ):
        return False
    if not _registered[0]:
        _register()
    return True


def push_seed(module: nn.Module, seed: Tensor) -> Tensor:
    """Keep a dropout call's seed for the per-sample rule (popped last first, as Opacus's activations)."""
    module.__dict__.setdefault("_ftk_dp_seeds", []).append(seed)
    return seed


def _pop_seed(module: nn.Module) -> Tensor:
    seeds = module.__dict__.get("_ftk_dp_seeds")
    if not seeds:
        raise RuntimeError(
            f"{type(module).__name__}: no dropout seed kept for Opacus's per-sample gradient (was the forward"
            " run before Opacus's hooks were added?)"
        )
    return seeds.pop()


def _dropout_on(layer: nn.Module) -> bool:
    return bool(layer.training and getattr(layer, "dropout", 0.0))


def lora_linear_grad_sample(layer, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of a ``LoRALinear`` / ``LoRAConv1D`` (see the module docstring).
    activations: ``[x]`` with x ``[N, ..., in]``; backprops: ``[N, ..., out]``. Returns
    ``{param: [N, *param.shape]}`` for its trainable parameters."""
    from ..nn.lora_conv1d import LoRAConv1D
    from ..ops.lora_dropout import lora_dropout_nograd

    if layer.dora:
        if _dropout_on(layer):
            raise NotImplementedError(
                f"Opacus: per-sample gradients of a DoRA {type(layer).__name__} with dropout are not supported"
                " (use dropout=0, or plain LoRA)"
            )
        return _vmap_rule(layer, activations[0], backprops)
    x = activations[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = backprops.to(acc)
    xd = x
    if _dropout_on(layer):
        xd = lora_dropout_nograd(x, layer.dropout, _pop_seed(layer))  # the forward's mask, regenerated
    xd = xd.to(acc)
    a, b, s = layer.lora_A, layer.lora_B, layer.scaling
    out = {}
    if b.requires_grad:
        u = xd @ a.to(acc).t()
        out[b] = (torch.einsum("n...o,n...r->nor", g, u) * s).to(b.dtype)
    if a.requires_grad:
        h = g @ b.to(acc)
        out[a] = (torch.einsum("n...r,n...k->nrk", h, xd) * s).to(a.dtype)
    lb = layer._parameters.get("lora_bias")  # y gains s * lora_bias: its gradient is s * sum of g
    if lb is not None and lb.requires_grad:
        out[lb] = (torch.einsum("n...o->no", g) * s).to(lb.dtype)
    w, bias = layer.base.weight, layer.base.bias
    if w.requires_grad:  # a base left trainable: the plain rule on x (no dropout there)
        gw = torch.einsum("n...o,n...k->nok", g, x.to(acc))
        out[w] = (gw.transpose(1, 2) if isinstance(layer, LoRAConv1D) else gw).to(w.dtype)  # HF Conv1D: [in, out]
    if bias is not None and bias.requires_grad:
        out[bias] = torch.einsum("n...o->no", g).to(bias.dtype)
    return out


@contextmanager
def _no_hooks(layer: nn.Module):
    """The layer's own hooks (Opacus's) off while its forward reruns per example: they would capture
    activations of the rerun."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    saved = [layer.__dict__[n] for n in names]
    for n in names:
        layer.__dict__[n] = OrderedDict()
    try:
        yield
    finally:
        for n, v in zip(names, saved, strict=True):
            layer.__dict__[n] = v


def _vmap_rule(layer: nn.Module, x: Tensor, g: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients of the layer's trainable parameters by ``vmap(grad)`` over its forward
    (our layers run plain torch ops under torch.func), with the layer's hooks off."""
    own = {n: p for n, p in layer.named_parameters() if p.requires_grad}

    def loss(params, xn, gn):
        out = torch.func.functional_call(layer, params, (xn.unsqueeze(0),), strict=False)
        return (out * gn.unsqueeze(0)).sum()

    with _no_hooks(layer):
        grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(
            {n: p.detach() for n, p in own.items()}, x, g
        )
    return {p: grads[n] for n, p in own.items()}


def vmap_grad_sample(layer, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients by vmap for the layers with no closed-form rule here (LoRA convs),
    refused with dropout on (vmap cannot redraw the call's mask)."""
    if _dropout_on(layer):
        raise NotImplementedError(
            f"Opacus: per-sample gradients of {type(layer).__name__} with LoRA dropout are not supported (its"
            " mask cannot be redrawn per example); use dropout=0 on it, or a Linear adapter"
        )
    return _vmap_rule(layer, activations[0], backprops)


def mha_grad_sample(layer, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Refused: Opacus keeps a module's positional inputs only, so a rerun would lose the masks
    nn.MultiheadAttention takes by keyword."""
    raise NotImplementedError(
        "Opacus: per-sample gradients of LoRAMultiheadAttention are not supported (its masks come by keyword,"
        " which Opacus does not keep). Run opacus.validators.ModuleValidator.fix(model) first, which swaps"
        " nn.MultiheadAttention for Opacus's DPMultiheadAttention, then apply LoRA to its Linear projections"
    )


def _register() -> None:
    from opacus.grad_sample import register_grad_sampler

    from ..nn.lora_conv1d import LoRAConv1D
    from ..nn.lora_conv2d import LoRAConv2d
    from ..nn.lora_conv_nd import LoRAConv1d, LoRAConv3d
    from ..nn.lora_linear import LoRALinear
    from ..nn.lora_mha import LoRAMultiheadAttention

    register_grad_sampler([LoRALinear, LoRAConv1D])(lora_linear_grad_sample)
    register_grad_sampler([LoRAConv1d, LoRAConv2d, LoRAConv3d])(vmap_grad_sample)
    register_grad_sampler(LoRAMultiheadAttention)(mha_grad_sample)
    _registered[0] = True
