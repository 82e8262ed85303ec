"""``LoRAParams``: LoRA on parameters of a module (PEFT's ``target_parameters`` / ``lora.ParamWrapper``).

transformers v5 stores a mixture-of-experts layer's experts as 3-D parameters of one module
(Mixtral's ``experts.gate_up_proj`` ``[E, 2I, H]`` and ``experts.down_proj`` ``[E, H, I]``) and its
router as a bare 2-D ``weight``: none of them is an ``nn.Linear``, so LoRA reaches them only as
parameters. PEFT's transformers-v5 conversion targets them under ``"all-linear"`` and the v4 names
(``w1`` / ``w2`` / ``w3``, ``gate``). Here:

- an experts module built with transformers' ``use_experts_implementation`` (its standard
  contract) runs :func:`ftkernels.ops.lora_experts.experts_forward`: each expert's projection plus
  its adapter, ``x W_e^T + s (x A_e^T) B_e^T``, on the tokens routed to it; the frozen stack is
  neither copied nor given a gradient (PEFT folds ``W + s B A`` into a copy of the whole stack
  every call and pays its dense gradient);
- any other module (a router, a parameter of a custom layer) runs its own forward on
  ``W + s B A`` for the call (``torch.func.functional_call``: nothing is written to it), which is
  PEFT's math.

Layout, init and scaling are PEFT's ``ParamWrapper``: per parameter of shape ``[E, out, in]`` (``[E,
in, out]`` where the module sets ``is_transposed``) or ``[out, in]`` (``E = 1``), ``lora_A`` ``[E*r,
in]`` (Kaiming-uniform) and ``lora_B`` ``[out, r*E]`` (zero), ``scaling = alpha / r`` (``alpha /
sqrt(r)`` with rslora). No LoRA dropout and no DoRA (PEFT refuses both on parameters).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..integrations import opacus as _dp
from ..ops import lora_experts, torch_func
from ._lora_common import FoldMixin, adapter_dtype, lora_scaling, peft_adapter


class ParamAdapter(nn.Module):
    """One parameter's adapter: ``lora_A`` ``[E*r, in]``, ``lora_B`` ``[out, r*E]``, ``r``, ``alpha``,
    ``rslora``, ``scaling``; ``num_experts`` (``E``) and ``transposed`` (the parameter is ``[E, in,
    out]``) describe the parameter it adapts."""

    def __init__(self, param: Tensor, r: int, alpha: float, rslora: bool, transposed: bool, name: str):
        super().__init__()
        if param.dim() not in (2, 3):
            raise ValueError(f"LoRAParams: {name} is {param.dim()}-D; LoRA adapts 2-D and 3-D parameters only")
        if not param.dtype.is_floating_point:
            raise TypeError(f"LoRAParams: {name} is {param.dtype}; a floating-point parameter is needed")
        self.scaling = lora_scaling(f"LoRAParams({name})", r, alpha, 0.0, rslora)
        self.r, self.alpha, self.rslora = int(r), alpha, bool(rslora)
        self.num_experts, self.ndim = (param.shape[0] if param.dim() == 3 else 1), param.dim()
        self.transposed = bool(transposed) and param.dim() == 3
        if param.dim() == 2:
            out_f, in_f = param.shape
        else:
            in_f, out_f = (param.shape[1], param.shape[2]) if self.transposed else (param.shape[2], param.shape[1])
        dtype, dev = adapter_dtype(param), param.device
        self.lora_A = nn.Parameter(torch.empty(self.num_experts * self.r, in_f, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_f, self.r * self.num_experts, device=dev, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's init: ``lora_A`` Kaiming-uniform (as an ``nn.Linear(in, E*r)``), ``lora_B`` zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta(self, dtype: torch.dtype | None = None) -> Tensor:
        """``scaling * B_e A_e`` shaped as the parameter (differentiable; in ``dtype`` if given)."""
        d = lora_experts.delta(self.lora_A, self.lora_B, self.num_experts, self.transposed) * self.scaling
        d = d[0] if self.ndim == 2 else d
        return d if dtype is None else d.to(dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, experts={self.num_experts}, transposed={self.transposed}"


class LoRAParams(FoldMixin, nn.Module):
    """LoRA on some parameters of ``base`` (see the module docstring for the math).

    ``params``: parameter names of ``base`` itself (in registration order when saved), or a dict
    name -> ``(r, alpha)`` for per-parameter ranks. ``forward`` takes what ``base.forward`` takes.
    ``adapters[name]`` holds each :class:`ParamAdapter`. ``merge`` adds ``s B A`` to the parameters
    (fp32 accumulation); :func:`ftkernels.unload_lora` puts ``base`` back."""

    dropout = 0.0
    dora = False

    def __init__(self, base: nn.Module, params, r: int = 8, alpha: float = 16, rslora: bool = False):
        super().__init__()
        from ..peft_compat import LORA_TYPES  # (it holds LoRAParams too)

        if isinstance(base, LORA_TYPES):
            raise TypeError(f"LoRAParams: {type(base).__name__} is a LoRA layer already; adapt its base's parameters")
        spec = dict(params) if isinstance(params, dict) else {n: (r, alpha) for n in params}
        if not spec:
            raise ValueError("LoRAParams: no parameter named")
        own = dict(base.named_parameters(recurse=False))
        unknown = [n for n in spec if n not in own]
        if unknown:
            raise ValueError(
                f"LoRAParams: {type(base).__name__} has no parameter {unknown[0]!r} (it has {sorted(own)})"
            )
        transposed = bool(getattr(base, "is_transposed", False))
        order = [n for n in own if n in spec]  # registration order: PEFT nests its wrappers in it
        self.adapters = nn.ModuleDict(
            {n: ParamAdapter(own[n], spec[n][0], spec[n][1], rslora, transposed, n) for n in order}
        )
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rslora = bool(rslora)
        self.merged = False

    # The model-level helpers read one r / alpha per layer: the first adapter's.
    r = property(lambda self: next(iter(self.adapters.values())).r)
    alpha = property(lambda self: next(iter(self.adapters.values())).alpha)

    def _fused(self) -> bool:
        """Whether the experts path applies: a standard transformers experts module whose adapted
        parameters are all among its projections."""
        names = {lora_experts.GATED_UP, lora_experts.UP, lora_experts.DOWN}
        return lora_experts.is_standard(self.base) and set(self.adapters) <= names

    def forward(self, *args, **kwargs):
        if self.merged or self.disabled:
            return self.base(*args, **kwargs)
        if any(a._forward_hooks and _dp.hooked(a) for a in self.adapters.values()):
            # Opacus hooks the adapters (they hold the trainable tensors) but they are never called: it
            # would find no per-sample gradient for them
            raise NotImplementedError(
                "LoRAParams: per-sample gradients (Opacus) of parameter adapters (target_parameters, the"
                " experts / router of a mixture-of-experts model) are not supported; adapt Linear modules"
                " instead (apply_lora(..., target_parameters=[]))"
            )
        # (under torch.func transforms the generic path below: the experts path splits tokens by a
        # host-side count, which vmap cannot batch)
        if self._fused() and not torch_func.active():
            hidden, index, weights = _experts_args(args, kwargs)
            loras = {n: (a.lora_A, a.lora_B, a.scaling) for n, a in self.adapters.items()}
            return lora_experts.experts_forward(self.base, hidden, index, weights, loras)
        # W + s B A for this call only, computed in W's dtype as PEFT does
        own = dict(self.base.named_parameters(recurse=False))
        swapped = {n: own[n] + a.delta(own[n].dtype) for n, a in self.adapters.items()}
        return torch.func.functional_call(self.base, swapped, args, kwargs, strict=False, tie_weights=False)

    def _merge_blocker(self) -> str | None:
        return None

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        own = dict(self.base.named_parameters(recurse=False))
        for n, a in self.adapters.items():
            p = own[n]
            acc = torch.float64 if p.dtype == torch.float64 else torch.float32
            p.copy_((p.to(acc) + sign * a.delta(acc)).to(p.dtype))

    @classmethod
    def from_peft_layer(cls, layer: nn.Module, adapter_name: str | None = None) -> LoRAParams:
        """The fused layer for a chain of PEFT ``lora.ParamWrapper`` (outermost first, each wrapping
        the next, the last one the module), sharing the module and copying each parameter's A and B.
        Raises for a merged adapter (unmerge it in PEFT first)."""
        chain, layer = peft_wrapper_chain(layer)
        if not chain:
            raise TypeError(f"LoRAParams.from_peft_layer: {type(layer).__name__} is not PEFT's lora.ParamWrapper")
        adapters = {}
        for w in chain:
            if adapter_name is not None and adapter_name not in w.lora_A:
                continue  # this parameter is not adapted by that adapter
            ad = peft_adapter(w, adapter_name)
            if ad.merged:
                raise NotImplementedError("LoRAParams.from_peft_layer: the adapter is merged; unmerge it in PEFT first")
            adapters[w.parameter_name] = ad
        rslora = {ad.rslora for ad in adapters.values()}
        if len(rslora) != 1:
            raise ValueError("LoRAParams.from_peft_layer: the wrapped parameters differ in use_rslora")
        new = cls(layer, {n: (ad.r, ad.alpha) for n, ad in adapters.items()}, rslora=rslora.pop())
        for n, ad in adapters.items():
            target = new.adapters[n]
            if target.lora_A.shape != ad.lora_A.shape or target.lora_B.shape != ad.lora_B.shape:
                raise ValueError(f"LoRAParams.from_peft_layer: {n}: PEFT's A/B shapes do not match this layout")
            target.lora_A, target.lora_B = (
                nn.Parameter(t.to(target.lora_A.dtype), requires_grad=t.requires_grad) for t in (ad.lora_A, ad.lora_B)
            )
            target.scaling = ad.scaling
        return new

    def extra_repr(self) -> str:
        return "experts path" if self._fused() else "W + s B A per call"


def peft_wrapper_chain(layer: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """PEFT's nested ``lora.ParamWrapper`` s from ``layer`` inwards (outermost first; empty when
    ``layer`` is not one) and the module they wrap. Matched by class name: PEFT stays an optional
    import here."""
    chain = []
    while type(layer).__name__ == "ParamWrapper":
        chain.append(layer)
        layer = layer.base_layer
    return chain, layer


def _experts_args(args, kwargs):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    if len(args) + len(kwargs) != 3:
        raise TypeError(f"LoRAParams: the experts module takes {names}, got {len(args)} args and {sorted(kwargs)}")
    vals = dict(zip(names, args, strict=False)) | kwargs
    return tuple(vals[n] for n in names)
