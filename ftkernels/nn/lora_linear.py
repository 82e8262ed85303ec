"""``LoRALinear``: a frozen ``nn.Linear`` plus a fused low-rank adapter, and its functional form."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..integrations import opacus as _dp
from ..ops import lora_linear as _ops
from ._lora_common import (
    LoRAMergeMixin,
    adapter_dtype,
    adopt_base,
    check_plain_base,
    lora_scaling,
    new_lora_bias,
    peft_adapter,
)
from .dora import dora_linear

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def draw_seed(device: torch.device) -> Tensor:
    """A fresh 62-bit dropout seed as an int64 scalar on ``device``, from that device's default
    generator (reproducible from ``torch.manual_seed``; no host sync on GPU)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


_UNUSED_SEEDS: dict[torch.device, Tensor] = {}


def _unused_seed(device: torch.device) -> Tensor:
    """A placeholder seed for dropout-free calls (never read), one per device: saves an allocation
    per layer call."""
    t = _UNUSED_SEEDS.get(device)
    if t is None:
        # Never an inference tensor (a first call under inference_mode would cache one, and a later
        # training call could then not save it for backward).
        with torch.inference_mode(False):
            t = _UNUSED_SEEDS[device] = torch.zeros((), dtype=torch.int64, device=device)
    return t


def call_seed(p: float, device: torch.device) -> Tensor:
    """The dropout seed of one call: a fresh draw (:func:`draw_seed`) when ``p > 0``, else the cached
    placeholder."""
    return draw_seed(device) if p > 0 else _unused_seed(device)


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul/conv on x in, or None when autocast is off for x."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return None


def _compute_dtype(x: Tensor, weight: Tensor, who: str) -> torch.dtype:
    """Autocast's dtype when it is on (any mix of x and weight dtypes then, as for nn.Linear/Conv2d),
    else x's, which the base weight must match."""
    dtype = _autocast_dtype(x)
    if dtype is not None:
        return dtype
    if weight.dtype != x.dtype:
        raise TypeError(
            f"{who}: x is {x.dtype} but the base weight is {weight.dtype}; like torch's layers, they must match"
        )
    return x.dtype


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = True,
    seed: Tensor | None = None,
) -> Tensor:
    """Fused LoRA linear: ``y = x W^T + b + scaling * (D(x) A^T) B^T``.

    Shapes: x ``[..., K]``, weight ``[N, K]``, bias ``[N]`` or None, lora_a ``[r, K]``, lora_b ``[N, r]``;
    returns ``[..., N]`` in the compute dtype (x's, or autocast's). ``D`` is dropout with probability
    ``dropout`` (when ``training``): a kept element is scaled by ``1/(1-p)``; the mask is drawn from
    the Philox stream of ``seed`` (an int64 scalar tensor on x's device; a fresh one from the default generator
    when None) and regenerated in backward, never stored. Adapter weights of another dtype (fp32
    adapters on a bf16 base) are cast to the compute dtype, differentiably.
    """
    if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError("lora_linear: weight, lora_a and lora_b must be 2-D")
    N, K = weight.shape
    r = lora_a.shape[0]
    _check_x(x, K)
    if lora_a.shape[1] != K or tuple(lora_b.shape) != (N, r):
        raise ValueError(
            f"lora_linear: lora_a {tuple(lora_a.shape)} / lora_b {tuple(lora_b.shape)} do not fit weight {N}x{K}:"
            f" expected [r, {K}] and [{N}, r]"
        )
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"lora_linear: bias has shape {tuple(bias.shape)}, expected ({N},)")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"lora_linear: x is on {x.device} but {name} is on {t.device}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_linear: dropout must be in [0, 1), got {dropout}")
    if seed is not None and (
        not isinstance(seed, Tensor) or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != x.device
    ):
        got = f"{seed.dtype} {tuple(seed.shape)} on {seed.device}" if isinstance(seed, Tensor) else type(seed).__name__
        raise ValueError(f"lora_linear: seed must be an int64 scalar tensor on {x.device}, got {got}")
    return _lora_linear(x, weight, bias, lora_a, lora_b, float(scaling), float(dropout) if training else 0.0, seed)


def _check_x(x, K: int) -> None:
    """The checks of x a call needs (a floating tensor ``[..., K]``); a layer makes only these."""
    if not isinstance(x, Tensor) or x.dtype not in _FLOATS:
        raise TypeError(f"lora_linear: x must be a floating tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"lora_linear: x has shape {tuple(x.shape)}, expected [..., {K}] (in_features of weight)")


def _lora_linear(x, weight, bias, lora_a, lora_b, scaling: float, p: float, seed) -> Tensor:
    """:func:`lora_linear` after its argument checks (``p``: the dropout in effect). A layer's own call
    enters here directly: its weights are checked at construction, only x is checked per call."""
    dtype = _compute_dtype(x, weight, "lora_linear")
    if dtype == torch.float64 and x.device.type == "cuda":
        raise TypeError("lora_linear: float64 runs on CPU only; use float32, bfloat16 or float16 on GPU")
    if seed is None:
        seed = call_seed(p, x.device)
    # The adapters keep their dtype: the op casts them inside its one autograd node (no cast nodes).
    _as = _ops._as
    return _ops.lora_linear_y(_as(x, dtype), _as(weight, dtype), _as(bias, dtype), lora_a, lora_b, scaling, p, seed)


def lora_op(x, weight, bias, lora_a, lora_b, scaling: float, p: float) -> Tensor:
    """The fused LoRA op with a fresh seed per call (the ``lora_fn`` :func:`ftkernels.nn.dora.dora_linear` takes)."""
    return _lora_linear(x, weight, bias, lora_a, lora_b, scaling, p, None)


class LoRALinear(LoRAMergeMixin, nn.Module):
    """Drop-in replacement for a frozen ``nn.Linear`` with a LoRA adapter, forward and backward fused.

    ``y = base(x) + scaling * dropout(x) @ lora_A^T @ lora_B^T`` with ``scaling = alpha / r``
    (``alpha / sqrt(r)`` with ``rslora``): PEFT's ``lora.Linear`` exactly. The base weight and bias
    are frozen; ``lora_A`` (``[r, in]``, Kaiming-uniform as PEFT) and ``lora_B`` (``[out, r]``, zero)
    train. Adapters are fp32 when the base is fp16/bf16 (PEFT's ``autocast_adapter_dtype``). Inputs of
    any leading shape; fp32/fp16/bf16 (fp64 on CPU); autocast is honoured. ``lora_bias=True`` adds a
    trained ``lora_bias`` ``[out]`` (zero-initialized; PEFT's ``lora_bias``, the bias of its lora_B):
    ``y += scaling * lora_bias``, merged into the base bias (which must exist to merge).
    """

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        rslora: bool = False,
        dora: bool = False,
        lora_bias: bool = False,
    ):
        super().__init__()
        self._check_base(base)
        out_f, in_f = self._shape_of(base)
        scaling = lora_scaling(type(self).__name__, r, alpha, dropout, rslora)
        self._adopt(base)
        self.r, self.alpha, self.dropout, self.rslora = int(r), alpha, float(dropout), rslora
        self.scaling = scaling
        dev, dtype = self._device_of(base), self._adapter_dtype(base)
        self.lora_A = nn.Parameter(torch.empty(self.r, in_f, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_f, self.r, device=dev, dtype=dtype))
        if lora_bias:
            self.lora_bias = new_lora_bias(type(self).__name__, out_f, dev, dtype, dora)
        if dora:  # the trained magnitude m [out] (PEFT's lora_magnitude_vector); set by reset_parameters
            self.lora_magnitude = nn.Parameter(torch.empty(out_f, device=dev, dtype=dtype))
        self.merged = False
        self.reset_parameters()

    # Subclasses wrap other layouts of the same map (HF Conv1D stores the weight as [in, out]) or run
    # the base themselves (LoRAQuantLinear): these hooks say where they differ.
    @classmethod
    def _shape_of(cls, base) -> tuple[int, int]:
        """``(out_features, in_features)`` of the map ``base`` computes."""
        return tuple(cls._linear_weight_of(base).shape)

    def _adopt(self, base) -> None:
        """Take ``base`` as this layer's frozen base (:func:`adopt_base`)."""
        adopt_base(self, base)

    @staticmethod
    def _device_of(base) -> torch.device:
        """The device of ``base``'s weight, where new adapters go."""
        return base.weight.device

    def _adapter_dtype(self, base) -> torch.dtype:
        """The dtype of new adapters (and a DoRA magnitude) over ``base`` (after :meth:`_adopt`)."""
        return adapter_dtype(base.weight)

    @staticmethod
    def _check_base(base) -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        check_plain_base("LoRALinear", base, nn.Linear)

    @staticmethod
    def _linear_weight_of(base) -> Tensor:
        return base.weight

    def linear_weight(self) -> Tensor:
        """The base weight as ``[out, in]`` (a view; writes go to the base layer)."""
        return self._linear_weight_of(self.base)

    in_features = property(lambda self: self.linear_weight().shape[1])
    out_features = property(lambda self: self.linear_weight().shape[0])
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)

    _fused_base = True  # the kernels read the base weight (a quantized base's layer runs the base itself)
    _lora_group = None  # a shared-input group (ftkernels/nn/lora_group.py) when siblings read the same x

    def forward(self, x: Tensor) -> Tensor:
        """x ``[..., in]`` -> y ``[..., out]`` = ``base(x) + scaling * dropout(x) @ A^T @ B^T`` (the base alone when
        merged or disabled). Siblings grouped by :func:`ftkernels.nn.lora_group.group_shared_inputs` run through
        the group.
        """
        if self._forward_hooks and _dp.hooked(self):  # Opacus: calls alone, each dropout seed kept
            return self._forward_alone(x, dp=True)
        if self._lora_group is not None and not (self.merged or self.disabled) and not torch.compiler.is_compiling():
            return self._lora_group(self, x)
        return self._forward_alone(x)

    def _forward_alone(self, x: Tensor, dp: bool = False) -> Tensor:
        base = self._modules["base"]  # (dict reads, not nn.Module.__getattr__: host time per call)
        if self.merged or self.disabled:
            return base(x)
        w = self._linear_weight_of(base)
        # Per call only x is checked (the weights were at construction): host time is what a small
        # layer's step is made of.
        _check_x(x, w.shape[1])
        if x.device != w.device:
            raise ValueError(f"{type(self).__name__}: x is on {x.device} but the layer is on {w.device}")
        p = self.dropout if self.training else 0.0
        if self.dora:
            _compute_dtype(x, w, type(self).__name__)  # x and W must match outside autocast, as for LoRA

            m = self._parameters["lora_magnitude"]
            return dora_linear(
                lora_op, x, w, base.bias, self.lora_A, self.lora_B, m, self.scaling, p, lambda: call_seed(p, x.device)
            )
        # (Opacus captures only calls that build a graph: only those keep their seed)
        seed = _dp.push_seed(self, draw_seed(x.device)) if dp and p > 0 and torch.is_grad_enabled() else None
        return _lora_linear(x, w, self._bias_with_lora(base.bias), self.lora_A, self.lora_B, self.scaling, p, seed)

    @classmethod
    def from_peft_layer(cls, layer, adapter_name: str | None = None) -> LoRALinear:
        """A fused layer over a PEFT ``lora.Linear``'s base layer (shared, not copied) with a copy of
        the adapter's A and B, its r, alpha, scaling (rslora included) and dropout p: a
        ``LoRALinear`` for an ``nn.Linear`` base, a :class:`LoRAConv1D` for a Hugging Face
        ``Conv1D`` base (PEFT's ``fan_in_fan_out``), a :class:`LoRAQuantLinear` for a bitsandbytes /
        torchao base or one computing its own output (QLoRA). A DoRA adapter brings its magnitude; LoRA
        bias (``lora_bias=True``) comes as :attr:`lora_bias`."""
        ad = peft_adapter(layer, adapter_name, lora_bias=True)
        base = ad.base
        if cls is LoRALinear:
            from .lora_conv1d import LoRAConv1D, is_hf_conv1d
            from .lora_quant import LoRAQuantLinear, quant_kind

            if quant_kind(base) is not None:  # PEFT's lora.bnb / torchao layers (QLoRA)
                cls = LoRAQuantLinear
            elif not isinstance(base, nn.Linear) and is_hf_conv1d(base):
                cls = LoRAConv1D
        cls._check_base(base)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._adopt(base)
        new.r, new.alpha, new.dropout, new.scaling, new.rslora = ad.r, ad.alpha, ad.dropout, ad.scaling, ad.rslora
        new.lora_A, new.lora_B, new.merged = ad.lora_A, ad.lora_B, ad.merged
        new._adopt_peft_extras(ad)
        return new

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"dropout={self.dropout}, rslora={self.rslora}, merged={self.merged}" + (", dora=True" if self.dora else "")
        )
