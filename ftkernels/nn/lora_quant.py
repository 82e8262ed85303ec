"""``LoRAQuantLinear``: LoRA over a quantized Linear (QLoRA): bitsandbytes' ``Linear4bit`` (NF4 / FP4)
and ``Linear8bitLt``, an ``nn.Linear`` holding a torchao quantized weight (``quantize_``), HQQ's
``HQQLinear`` (1 to 8 bits, hqq's ``AutoHQQHFModel.quantize_model``), and an ``nn.Linear`` subclass computing its
own output (torchao's QAT ``FakeQuantizedLinear``).

The fused layers compute a base's output from its weight; a quantized weight is only readable by its
own kernels, so here the base layer runs itself and the adapter's path is one fused node
(:mod:`ftkernels.ops.lora_quant`) with its dropout mask regenerated, never stored. The math and dtypes
are PEFT's ``lora.bnb.Linear4bit`` / ``Linear8bitLt`` (and ``TorchaoLoraLinear``): ``y = base(x) + s B A
D(x)`` with x cast to the adapters' dtype (fp32), or under autocast the adapter path in autocast's dtype;
PEFT's bitsandbytes layers round the adapter path to the base output's dtype before the sum, its
torchao and HQQ layers round the sum.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from ..integrations import opacus as _dp
from ..ops import torch_func
from ..ops.lora_dropout import lora_dropout
from ..ops.lora_quant import dequant_linear, lora_delta
from ._lora_common import (
    _plain_output,
    _probe_input,
    adapter_dtype,
    adopt_base,
    outputs_match,
)
from .dora import dora_combine, dora_scale
from .lora_linear import LoRALinear, _autocast_dtype, _check_x, call_seed

_KINDS = {"Params4bit": "4bit", "Int8Params": "8bit"}


def quant_kind(module: nn.Module) -> str | None:
    """``"4bit"`` / ``"8bit"`` for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, ``"torchao"`` for an
    ``nn.Linear`` whose weight is a torchao quantized tensor (a ``TorchAOBaseTensor``), ``"custom"`` for an
    ``nn.Linear`` subclass with a float weight whose own forward computes something else than ``x W^T +
    b`` of the same shape (torchao's QAT ``FakeQuantizedLinear``: checked on a random input), ``"hqq"`` for
    HQQ's ``HQQLinear`` (not an nn.Linear), else None. Libraries are told by package and type names, so
    none is imported."""
    if not isinstance(module, nn.Linear):
        cls = type(module)
        return "hqq" if cls.__name__ == "HQQLinear" and cls.__module__.startswith("hqq.") else None
    w = type(module.weight)
    if type(module).__module__.startswith("bitsandbytes"):
        return _KINDS.get(w.__name__)
    if any(c.__name__ == "TorchAOBaseTensor" and c.__module__.startswith("torchao") for c in w.__mro__):
        return "torchao"
    return "custom" if _own_forward(module) else None


def _own_forward(module: nn.Linear) -> bool:
    """Whether ``module`` (an nn.Linear subclass, plain float weight) overrides forward with other math
    whose output is still a tensor shaped as the Linear's (a router returning a tuple is not: refused)."""
    w = module.weight
    if type(module).forward is nn.Linear.forward or w.is_meta or not w.dtype.is_floating_point:
        return False
    if type(w) not in (Tensor, nn.Parameter):
        return False
    x = _probe_input(module, nn.Linear)
    with torch.no_grad():
        got, want = module.forward(x), _plain_output(module, nn.Linear, x)
    return isinstance(got, Tensor) and got.shape == want.shape and not outputs_match(got, want)


class LoRAQuantLinear(LoRALinear):
    """LoRA over a frozen quantized Linear (QLoRA): bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``
    (PEFT's ``lora.bnb.Linear4bit`` / ``Linear8bitLt`` exactly), an ``nn.Linear`` with a torchao
    quantized weight (PEFT's ``TorchaoLoraLinear``), HQQ's ``HQQLinear`` (PEFT's ``HqqLoraLinear``; its
    merge quantizes again with the layer's own config, keeping the bias, which PEFT's drops), or an
    ``nn.Linear`` subclass whose own forward computes
    something else than ``x W^T + b`` (kind ``"custom"``: torchao's QAT ``FakeQuantizedLinear``; PEFT's
    ``lora.Linear`` calls such a base, so its outputs are kept; merge writes into its float weight, with
    a warning).

    ``y = base(x) + s * (D(x_c) A_c^T) B_c^T``: the base layer computes its own (dequantizing) output;
    ``_c`` is the compute dtype of the adapter path, the adapters' dtype (fp32, as PEFT makes them over a
    quantized weight), or autocast's when it is on; y is in the base output's dtype (bitsandbytes: the
    adapter path is rounded to it before the sum; torchao, HQQ: the sum is). Shapes: x ``[..., in]``,
    ``lora_A`` ``[r, in]`` (Kaiming-uniform), ``lora_B`` ``[out, r]`` (zero), y ``[..., out]``. ``D`` is
    LoRA dropout, its mask regenerated in backward from a seed. :meth:`merge` (bitsandbytes) dequantizes
    the base weight, adds ``s B A`` and quantizes again (lossy, as in PEFT: a warning says so); a torchao
    base is not merged (its quantization recipe is not known here). ``dora=True`` (QDoRA): a trained
    magnitude ``lora_magnitude`` ``[out]``, PEFT's form over quantized bases (:meth:`_dora_forward`).
    """

    _fused_base = False  # never in a shared-input group: the group's kernels read the base weight

    @classmethod
    def _shape_of(cls, base) -> tuple[int, int]:
        return base.out_features, base.in_features  # (a packed quantized weight has another shape)

    def _adopt(self, base) -> None:
        adopt_base(self, base)
        self.kind = quant_kind(base)  # "4bit" / "8bit" (bitsandbytes), "torchao", "hqq" or "custom"

    @staticmethod
    def _device_of(base) -> torch.device:
        w = getattr(base, "weight", None)
        return w.device if isinstance(w, Tensor) else base.W_q.device  # (HQQ keeps W_q, no weight)

    def _adapter_dtype(self, base) -> torch.dtype:
        if self.kind == "custom":  # (a float weight: PEFT's rule for it)
            return adapter_dtype(base.weight)
        # PEFT's adapters over a quantized weight keep the default dtype, upcast to fp32 from fp16/bf16
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32

    @staticmethod
    def _check_base(base) -> None:
        if quant_kind(base) is None:
            w = getattr(base, "weight", None)
            raise TypeError(
                f"LoRAQuantLinear wraps a bitsandbytes Linear4bit / Linear8bitLt, an nn.Linear with a torchao weight,"
                f" HQQ's HQQLinear or an nn.Linear subclass computing its own output, got {type(base).__name__} with"
                f" a {type(w).__name__} weight"
            )

    def linear_weight(self) -> Tensor:
        """The base weight dequantized, ``[out, in]`` (a new tensor: writes do not reach the base)."""
        return self._dequantized()

    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def forward(self, x: Tensor) -> Tensor:
        """x ``[..., in]`` -> ``base(x) + s D(x) A^T B^T`` ``[..., out]`` (the base alone when merged or
        disabled)."""
        if self._forward_hooks and _dp.hooked(self):
            raise NotImplementedError(
                "LoRAQuantLinear: per-sample gradients (Opacus) over a quantized base are not supported"
            )
        base = self._modules["base"]
        if self.merged or self.disabled:
            return base(x)
        _check_x(x, base.in_features)
        y = base(x)
        a, b = self._parameters["lora_A"], self._parameters["lora_B"]
        p = self.dropout if self.training else 0.0
        dtype = _autocast_dtype(x) or a.dtype
        if self.dora:
            return self._dora_forward(x, y, a, b, p, dtype)
        lb = self._parameters.get("lora_bias")
        round_sum = self.kind in ("torchao", "hqq", "custom")  # PEFT's lora.Linear rule: one rounding, of the sum
        # (bitsandbytes' rule: the adapter output, its bias included, rounded to y's dtype, then added; without
        # a bias the node rounds it)
        out_dtype = dtype if round_sum or lb is not None else y.dtype
        delta = lora_delta(x, a, b, self.scaling, p, call_seed(p, x.device), dtype, out_dtype)
        if lb is not None:
            delta = delta + lb.to(dtype) * self.scaling
        return (y + delta).to(y.dtype) if round_sum else y + delta.to(y.dtype)

    def _dora_forward(self, x: Tensor, y: Tensor, a: Tensor, b: Tensor, p: float, dtype: torch.dtype) -> Tensor:
        """QDoRA, PEFT's form over a quantized base: with ``mns = m / ||W + s B A||_row`` (W dequantized,
        the norm a constant), ``y + (mns - 1) t + mns s D(x) A^T B^T`` in fp32, rounded to y's dtype, where
        ``t = y - b`` without dropout and ``t = D(x) W^T`` with it (W dequantized again in backward, not
        kept: PEFT keeps a float copy of every such weight until backward). The sum is one node keeping t
        and the delta node's u, not the delta (:func:`ftkernels.nn.dora.dora_combine`)."""
        mns = dora_scale(self._parameters["lora_magnitude"], self._dequantized(), a, b, self.scaling)
        seed = call_seed(p, x.device)
        delta, u = lora_delta(x, a, b, self.scaling, p, seed, dtype, dtype, with_u=True)
        if p == 0:
            bias = self.base.bias
            t = y if bias is None else y - bias
        else:  # the same seed: the same mask as the adapter path's
            xc = x if x.dtype == dtype else x.to(dtype)
            t = dequant_linear(
                self, torch_func.dropped(xc, p, seed) if torch_func.active() else lora_dropout(xc, p, seed)
            )
        return dora_combine(y, t, delta, u, b, mns, self.scaling)

    # Merging: dequantize, add, quantize again (PEFT's rule for bitsandbytes and HQQ layers).

    def _quantized(self) -> bool:
        kind = self.kind
        if kind == "hqq":
            return getattr(self.base, "W_q", None) is not None
        if kind in ("torchao", "custom"):
            return True
        w = self.base.weight
        return getattr(w, "quant_state", None) is not None if kind == "4bit" else w.dtype == torch.int8

    def _merge_blocker(self) -> str | None:
        reason = super()._merge_blocker()  # (a LoRA bias over a base without a bias)
        if reason is not None:
            return reason
        if self.kind == "torchao":
            return (
                "a torchao quantized base weight cannot take the merge here (quantizing it again needs its"
                " recipe); unload without merging, or merge into a float copy of the base"
            )
        if not self._quantized():
            return "its bitsandbytes weight is not quantized yet (move the model to its device first)"
        return None

    def _dequantized(self) -> Tensor:
        if self.kind == "custom":
            return self.base.weight.detach()
        if self.kind == "torchao":
            return self.base.weight.dequantize()
        if self.kind == "hqq":
            return self.base.dequantize()
        import bitsandbytes as bnb

        if not self._quantized():
            raise RuntimeError(f"{type(self).__name__}: {self._merge_blocker()}")
        w = self.base.weight
        if self.kind == "4bit":
            return bnb.functional.dequantize_4bit(w.data, w.quant_state)
        state = self.base.state
        scb = w.SCB if getattr(w, "SCB", None) is not None else state.SCB  # (moved to state by the first forward)
        return bnb.functional.int8_vectorwise_dequant(w.data, scb.to(w.device))

    def _merge_target(self) -> Tensor:
        return self._dequantized()

    @torch.no_grad()
    def _write_merge_target(self, new: Tensor) -> None:
        if self.kind == "custom":  # a float weight, written in place (PEFT's merge of its lora.Linear)
            warnings.warn(
                f"{type(self).__name__}: the merged weight goes into {type(self.base).__name__}, whose own forward"
                " then runs on it: the same outputs only where that forward is linear in the weight",
                stacklevel=4,
            )
            self.base.weight.copy_(new)
            return
        into = "an HQQ" if self.kind == "hqq" else "a bitsandbytes"
        warnings.warn(
            f"{type(self).__name__}: the merged weight is quantized again, so outputs differ from the unmerged"
            f" layer's by rounding (as PEFT's merge into {into} layer)",
            stacklevel=4,
        )
        if self.kind == "hqq":
            self._requantize_hqq(new)
            return
        import bitsandbytes as bnb

        base, w = self.base, self.base.weight
        if self.kind == "4bit":
            q = w.quant_state
            new_w = bnb.nn.Params4bit(
                new.to("cpu"), requires_grad=False, blocksize=q.blocksize, compress_statistics=w.compress_statistics,
                quant_type=q.quant_type, quant_storage=w.quant_storage, module=base,
            )  # fmt: skip
        else:
            new_w = bnb.nn.Int8Params(new.to("cpu"), requires_grad=False, has_fp16_weights=False)
            base.state.reset_grads()
            base.state.SCB = base.state.CB = None
        base.weight = new_w.to(w.device)  # (moving it quantizes it)

    def _requantize_hqq(self, new: Tensor) -> None:
        """``new`` quantized into a new HQQLinear with the base's config, compute dtype, device and
        bias (PEFT's merge for HQQ, which drops the bias); it becomes the base."""
        base = self.base
        cfg = {**copy.deepcopy(base.quant_config), "offload_meta": base.offload_meta}
        layer = type(base)(None, cfg, compute_dtype=base.compute_dtype, device=base.device)
        cfg.pop("offload_meta", None)
        layer.quantize(new.to(base.compute_dtype), **cfg)
        layer.bias = base.bias
        layer.train(base.training)
        adopt_base(self, layer)

    def extra_repr(self) -> str:
        return f"{self.kind}, " + super().extra_repr()
