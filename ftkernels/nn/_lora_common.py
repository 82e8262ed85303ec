"""What every fused LoRA layer shares: folding ``scaling * B A`` into the base weight and back, and
reading one adapter out of a PEFT LoRA layer."""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm

from .dora import dora_weight_norm


def lora_scaling(name: str, r, alpha, dropout, rslora: bool) -> float:
    """Check one layer's LoRA hyperparameters and return ``scaling = alpha / r`` (``alpha / sqrt(r)``
    with rslora). ``r`` is an int >= 1 (as in PEFT, it may exceed the layer's smaller dimension: a
    2-class head under ``"all-linear"`` with r=8 is legal, just not low rank), ``alpha`` a finite
    number (a NaN or inf scaling would poison every output), ``dropout`` in ``[0, 1)``."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"{name}: r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"{name}: alpha must be a finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout!r}")
    return scaling_of(alpha, r, rslora)


def _plain_output(base: nn.Module, plain: type, x: Tensor) -> Tensor:
    """What the plain ``nn.Linear`` / ``nn.Conv1d/2d/3d`` / HF ``Conv1D`` computes from ``base``'s weight,
    bias and geometry."""
    if issubclass(plain, nn.modules.conv._ConvNd):
        return plain._conv_forward(base, x, base.weight, base.bias)
    return plain.forward(base, x)


def tf_same_pad(x: Tensor, kernel, stride, dilation) -> Tensor:
    """x zero-padded for TensorFlow's dynamic "SAME" conv (timm's ``Conv2dSame``, TF-ported
    EfficientNet / MixNet / MobileNetV3): per spatial dim of size i, ``pad = max((ceil(i / s) - 1) s +
    (k - 1) d + 1 - i, 0)``, ``pad // 2`` before and the rest after; the conv then runs unpadded.
    x ``[N, C, *S]``."""
    sizes = zip(x.shape[2:], kernel, stride, dilation, strict=True)
    flat = pad_list([max((-(-i // s) - 1) * s + (k - 1) * d + 1 - i, 0) for i, k, s, d in sizes])
    return F.pad(x, flat) if any(flat) else x


def pad_list(totals) -> list[int]:
    """``F.pad``'s argument for a total padding per spatial dim (first dim first), ``total // 2`` before
    and the rest after, as torch's ``padding="same"`` and TensorFlow's "SAME" both split it."""
    return [q for t in reversed(totals) for q in (t // 2, t - t // 2)]  # F.pad takes the last dim first


def _probe_input(base: nn.Module, plain: type, extra: int = 0) -> Tensor:
    """A small random input for ``base`` (a private generator: the global RNG stream is untouched); a
    conv's spatial sizes differ by one between ``extra=0`` and ``extra=1`` (each dim seen at both parities
    across the two)."""
    w = base.weight
    if issubclass(plain, nn.modules.conv._ConvNd):
        sizes = zip(base.kernel_size, base.stride, base.dilation, strict=True)
        shape = (1, base.in_channels, *(d * (k - 1) + 2 * s + 3 + (i + extra) % 2 for i, (k, s, d) in enumerate(sizes)))
    else:
        shape = (3, w.shape[0] if hasattr(base, "nx") else w.shape[1])  # HF Conv1D stores [in, out]
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen).to(device=w.device, dtype=w.dtype)


def _same_output(base: nn.Module, x: Tensor, want_fn) -> bool:
    with torch.no_grad():
        got, want = base.forward(x), want_fn(x)
    return outputs_match(got, want)


def outputs_match(got, want: Tensor) -> bool:
    """Whether a probe's output ``got`` is ``want`` to rounding (want's dtype sets the tolerance)."""
    tol = 1e-4 if want.dtype in (torch.float32, torch.float64) else 2e-2
    if not isinstance(got, Tensor):  # (a router returning (weights, indices), as PhiMoE's)
        return False
    return got.shape == want.shape and bool(
        ((got.float() - want.float()).abs() <= tol * (1 + want.float().abs().max())).all()
    )


def check_plain_base(
    name: str, base: nn.Module, plain: type, methods: tuple[str, ...] = ("forward",), tf_same: bool = False
) -> bool:
    """The fused LoRA layers (and the masked layers replacing a Linear / Conv2d) compute the base's
    output from its weight, bias and geometry themselves; they never call ``base.forward``. A weight
    that is not a plain floating tensor (a quantized tensor subclass) is refused. A subclass that
    overrides ``methods`` is run once on a small random input against the plain layer's math: the same
    output (Falcon's ``FalconLinear``, which only reorders ``x W^T + b``) is accepted; another one
    (timm's ``StdConv2d`` standardizes its weight, bitsandbytes' layers dequantize) is refused, as it
    would silently change the model (``apply_lora`` gives such a Linear :class:`ftkernels.nn.LoRAQuantLinear`,
    which runs it). With ``tf_same``, an unpadded conv whose forward is the conv of
    :func:`tf_same_pad` (timm's ``Conv2dSame``; checked on inputs of both parities) is accepted, and
    True returned: the caller pads that way. Forward hooks on the base would not run: a warning
    says so."""
    w = base.weight
    plain_tensor = type(w) in (Tensor, nn.Parameter) or type(w).__name__ == "DTensor"
    if not plain_tensor or not w.dtype.is_floating_point:
        raise TypeError(
            f"{name}: the base weight is a {type(w).__name__} of {w.dtype}; the fused kernels need a plain"
            " floating-point tensor (ftk.nn.LoRAQuantLinear, which apply_lora picks, runs bitsandbytes and"
            " torchao Linears themselves; other quantized weights need PEFT's LoRA layer)"
        )
    own = [m for m in methods if getattr(type(base), m) is not getattr(plain, m)]
    dynamic = False
    if own:
        what = f"{type(base).__name__} overrides {plain.__name__}.{own[0]}"
        if w.is_meta:
            raise TypeError(f"{name}: {what} and its weight is on the meta device, so it cannot be checked")
        conv = issubclass(plain, nn.modules.conv._ConvNd)
        probes = [_probe_input(base, plain)] + ([_probe_input(base, plain, extra=1)] if conv else [])
        # (a conv is probed with every spatial dim at both parities: dynamic padding cannot pass for static)
        if not all(_same_output(base, t, lambda t: _plain_output(base, plain, t)) for t in probes):

            def padded(t):
                return _plain_output(base, plain, tf_same_pad(t, base.kernel_size, base.stride, base.dilation))

            dynamic = tf_same and conv and not any(base.padding) and all(_same_output(base, t, padded) for t in probes)
            if not dynamic:
                way = (
                    "ftk.nn.LoRAQuantLinear (what apply_lora picks for such a Linear) runs the base's own forward"
                    if plain is nn.Linear
                    else "weight-standardized or quantized convs need PEFT's LoRA layer"
                )
                raise TypeError(
                    f"{name}: {what} and computes something else than it (checked on a random input); the"
                    " replacing layer computes the plain output from the weight itself, so the model would"
                    f" change. {way}"
                )
    if _foreign_hooks(base):
        warnings.warn(
            f"{name}: the base {type(base).__name__} has forward hooks; the replacing layer computes its output"
            " without calling it, so they will not run (register them on the new layer instead)",
            stacklevel=3,
        )
    return dynamic


def fast_path_guard(module: nn.Module, args) -> None:
    """A no-op forward pre-hook put on a fused LoRA layer's base layer, which the LoRA layer never
    calls while unmerged. torch's ``nn.TransformerEncoderLayer`` (eval, no grad) runs one fused
    kernel that reads ``linear1.weight`` / ``self_attn.in_proj_weight`` & co. directly, so the
    adapters would be silently skipped at inference (PEFT's layers are). It falls back to calling its
    layers when any submodule has a hook: this one."""
    return None


def guard_base(base: nn.Module) -> None:
    """Put :func:`fast_path_guard` on ``base`` (once)."""
    if fast_path_guard not in base._forward_pre_hooks.values():
        base.register_forward_pre_hook(fast_path_guard)


def release_base(base: nn.Module) -> None:
    """Take :func:`fast_path_guard` off ``base`` (the layer goes back into the model)."""
    for key in [k for k, h in base._forward_pre_hooks.items() if h is fast_path_guard]:
        del base._forward_pre_hooks[key]


def _foreign_hooks(base: nn.Module) -> bool:
    """Whether ``base`` has forward hooks other than :func:`fast_path_guard` (or Accelerate's)."""
    pre = [h for h in base._forward_pre_hooks.values() if h is not fast_path_guard]
    return bool(base._forward_hooks or pre or hasattr(base, "_hf_hook"))


def adopt_base(layer: nn.Module, base: nn.Module) -> None:
    """``layer.base = base``, frozen and guarded (:func:`guard_base`): a fused layer reads its base's
    weights, never its forward."""
    layer.base = base
    for q in base.parameters():
        q.requires_grad_(False)
    guard_base(base)


@contextlib.contextmanager
def rng_kept(device: torch.device):
    """Random draws inside (a new layer's init that is overwritten at once) leave the global RNG
    streams as they were: converting a PEFT model must not shift a seeded run's later draws."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        yield


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """The dtype of new adapters over a base weight: fp32 over fp16/bf16 (PEFT's
    ``autocast_adapter_dtype``), else the weight's own."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def scaled_delta(lora_b: Tensor, lora_a: Tensor, scaling: float) -> Tensor:
    """``scaling * B A`` without gradient, in fp32 (fp64 for fp64 adapters), A and B flattened to
    ``[r, -1]`` and ``[out, r]``."""
    acc = torch.float64 if lora_a.dtype == torch.float64 else torch.float32
    a = lora_a.detach().to(acc).reshape(lora_a.shape[0], -1)
    return scaling * (lora_b.detach().to(acc).reshape(lora_b.shape[0], -1) @ a)


def new_lora_bias(name: str, out: int, device: torch.device, dtype: torch.dtype, dora: bool) -> nn.Parameter:
    """A LoRA bias (PEFT's ``lora_bias=True``: ``lora_B``'s bias) ``[out]`` of the adapters' dtype on
    ``device`` (set by ``reset_parameters``). Refused with DoRA, as PEFT refuses it."""
    if dora:
        raise ValueError(f"{name}: lora_bias is not supported with DoRA (PEFT refuses it too)")
    return nn.Parameter(torch.empty(out, device=device, dtype=dtype))


def scaling_of(alpha, r: int, rslora: bool) -> float:
    """PEFT's ``scaling``: ``alpha / r``, or ``alpha / sqrt(r)`` with rslora."""
    return float(alpha) / (math.sqrt(r) if rslora else int(r))


class FoldMixin:
    """``merge`` / ``unmerge`` of a LoRA layer with ``merged``, ``_merge_blocker()`` (why the delta
    cannot be stored, or None) and ``_fold(sign)`` (adds ``sign * s B A`` to the base weights)."""

    # True while :func:`ftkernels.disable_adapters` holds: forward runs the base layer alone (a class
    # attribute, so layers built by from_peft_layer without __init__ have it; one lookup per call)
    disabled = False

    @property
    def can_merge(self) -> bool:
        """Whether ``scaling * B A`` fits in the base weight (not for a grouped conv)."""
        return True

    @property
    def has_lora_bias(self) -> bool:
        """Whether this layer has a LoRA bias ``lora_bias`` ``[out]`` (PEFT's ``lora_bias=True``): the
        output gains ``scaling * lora_bias``."""
        return "lora_bias" in self._parameters

    def _bias_with_lora(self, bias: Tensor | None) -> Tensor | None:
        """The bias the kernels add: the base's ``bias``, plus ``scaling * lora_bias`` with a LoRA bias
        (PEFT's ``lora_B`` bias, scaled with B's output), in one [out]-sized op: its gradient is the
        kernels' bias gradient, which autograd routes to lora_bias (and to a trainable base bias)."""
        lb = self._parameters.get("lora_bias")
        if lb is None:
            return bias
        return lb * self.scaling if bias is None else torch.add(bias, lb, alpha=self.scaling)

    def _check_mergeable(self, what: str, write: bool = True) -> None:
        """Raise where the delta does not fit the base weight (or, with ``write``, cannot be stored in it)."""
        reason = self._merge_blocker() if write or not self.can_merge else None
        if reason is not None:
            raise NotImplementedError(f"{type(self).__name__}.{what}: {reason}; keep the adapter unmerged")

    def merge(self) -> None:
        """Fold ``scaling * B A`` into the base weight(s) (fp32 accumulation); forward then runs the base
        layer alone, and the adapters get no gradient until :meth:`unmerge`. Raises, changing nothing,
        where the delta cannot be stored (:meth:`_check_mergeable`: a grouped conv, a base weight
        parametrized other than by weight_norm)."""
        self._check_mergeable("merge")
        if self.merged:
            warnings.warn(f"{type(self).__name__}.merge: already merged; nothing done", stacklevel=2)
            return
        self._fold(1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ``scaling * B A`` from the base weight(s) again (fp32 accumulation)."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__}.unmerge: not merged; nothing done", stacklevel=2)
            return
        self._fold(-1.0)
        self.merged = False


class LoRAMergeMixin(FoldMixin):
    """``delta_weight`` / ``merge`` / ``unmerge`` for a layer with a ``base`` layer, ``lora_A`` ``[r, ...]``,
    ``lora_B`` ``[out, r, ...]``, ``scaling`` and ``merged``; ``_merge_view`` says where ``B A`` goes
    in the base weight."""

    @staticmethod
    def _merge_view(weight: Tensor) -> Tensor:
        """Where ``s B A`` goes in a tensor laid out as the base weight: itself (a transposed view for
        weights stored ``[in, out]``)."""
        return weight

    def _merge_target(self) -> Tensor:
        """The base weight as ``B A`` is shaped (a view of it; computed afresh for a parametrized base)."""
        return self._merge_view(self.base.weight)

    def _merge_blocker(self) -> str | None:
        """Why :meth:`merge` cannot fold ``B A`` into the base weight, or None."""
        if not self.can_merge:
            return "a grouped base conv cannot hold the dense delta B A (PEFT does not merge it either)"
        if self.has_lora_bias and self.base.bias is None:
            return "its base layer has no bias to take the LoRA bias (PEFT cannot merge it either)"
        if parametrize.is_parametrized(self.base, "weight"):
            plist = self.base.parametrizations.weight
            if not all(isinstance(q, _WeightNorm) for q in plist):
                # the merged weight is written back through right_inverse: exact for weight_norm only
                kinds = ", ".join(type(q).__name__ for q in plist)
                return f"its base weight is parametrized ({kinds}), which cannot store a merged weight"
        return None

    @torch.no_grad()
    def _write_merge_target(self, new: Tensor) -> None:
        """Store ``new`` (shaped as :meth:`_merge_target`) as the base weight: in place, or for a
        weight-normed base through the parametrization (``right_inverse`` sets g and v, so the
        computed weight is ``new`` up to rounding; a copy into the computed tensor would be lost)."""
        if not parametrize.is_parametrized(self.base, "weight"):
            self._merge_target().copy_(new)
            return
        full = self.base.weight.detach().clone()
        self._merge_view(full).copy_(new)
        self.base.weight = full

    @property
    def dora(self) -> bool:
        """Whether this layer is DoRA: a trained magnitude ``lora_magnitude`` (``[out]`` for Linear,
        ``[1, out, 1, 1]`` for Conv2d, ``[1, out, 1]`` / ``[1, out, 1, 1, 1]`` for Conv1d / Conv3d,
        PEFT's shapes; :mod:`ftkernels.nn.dora`)."""
        return "lora_magnitude" in self._parameters

    def _dora_operands(self, weight: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, float]:
        """``(W, A, B, s)`` as DoRA's row norms take them: ``[out, in * kh * kw]``, ``[r, ...]``, ``[out, r]``
        (W from ``weight``, the base weight already read, else read here)."""
        w = self._merge_target() if weight is None else self._merge_view(weight)
        return w.flatten(1), self.lora_A.flatten(1), self.lora_B.flatten(1), self.scaling

    def dora_row_norm(self) -> Tensor:
        """``||W + s B A||`` per output row / channel ``[out]`` (fp32; no gradient)."""
        return dora_weight_norm(*self._dora_operands())

    def _adopt_peft_extras(self, ad: SimpleNamespace) -> None:
        """Take a PEFT adapter's LoRA bias and DoRA magnitude (:func:`peft_adapter`), and for a merged
        DoRA adapter the row norms PEFT kept for its unmerge."""
        if ad.lora_bias is not None:
            self.lora_bias = ad.lora_bias
        if ad.magnitude is not None:
            self.lora_magnitude = ad.magnitude
            self._dora_norm = ad.merged_norm

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's default adapter init, in place: ``lora_A`` Kaiming-uniform (a = sqrt(5)), ``lora_B``
        zero and, for DoRA, the magnitude set to the base weight's row norms, so the layer starts as
        its base. What meta-device initialization calls after ``model.to_empty(...)`` (the base layer
        has its own ``reset_parameters``). Raises when merged (the base weight holds the old ``B A``)."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.reset_parameters: the adapter is merged; unmerge() first")
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.has_lora_bias:
            nn.init.zeros_(self.lora_bias)
        if self.dora:
            self.lora_magnitude.copy_(self.dora_row_norm().view_as(self.lora_magnitude))

    def delta_weight(self) -> Tensor:
        """``scaling * B A`` shaped like the merge target, in fp32 (fp64 for fp64 adapters); A and B
        are flattened to ``[r, -1]`` and ``[out, r]`` (a conv's A spans ``in * kh * kw``). Raises
        where :attr:`can_merge` is false."""
        self._check_mergeable("delta_weight", write=False)
        return scaled_delta(self.lora_B, self.lora_A, self.scaling).view(self._merge_target().shape)

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        """Plain LoRA adds ``sign * s B A``. DoRA merges ``W' = mns * (W + s B A)`` per output row
        (fp32), keeping the row norms of the unmerged weight for the unmerge (PEFT's rule)."""
        w, delta = self._merge_target(), self.delta_weight()
        if not self.dora:
            self._write_merge_target((w.to(delta.dtype) + sign * delta).to(w.dtype))
            if self.has_lora_bias:  # PEFT folds scaling * lora_B.bias into the base bias
                b = self.base.bias
                b.copy_((b.to(delta.dtype) + sign * self.scaling * self.lora_bias.detach().to(delta.dtype)).to(b.dtype))
            return
        if sign > 0:
            self._dora_norm = self.dora_row_norm()
        elif getattr(self, "_dora_norm", None) is None:
            raise RuntimeError(f"{type(self).__name__}.unmerge: the row norms of the unmerged weight are unknown")
        factor = (self.lora_magnitude.reshape(-1).to(delta.dtype) / self._dora_norm.to(delta.dtype)).view(
            -1, *[1] * (w.dim() - 1)
        )
        new = (w.to(delta.dtype) + delta) * factor if sign > 0 else w.to(delta.dtype) / factor - delta
        self._write_merge_target(new.to(w.dtype))
        if sign < 0:
            self._dora_norm = None


def peft_adapter(layer, adapter_name: str | None = None, lora_bias: bool = False) -> SimpleNamespace:
    """One adapter of a PEFT LoRA layer: ``name, base, r, alpha, scaling, dropout, rslora, lora_A,
    lora_B`` (copies, keeping requires_grad), ``merged``, ``lora_bias`` (a copy of ``lora_B``'s bias
    ``[out]`` for PEFT's ``lora_bias=True``, else None), and for DoRA ``magnitude`` (a copy; None
    otherwise) and ``merged_norm`` (PEFT's cached row norms ``[out]`` of a merged DoRA weight, else
    None). Raises for an unknown adapter, a LoRA bias where the caller takes none (``lora_bias``
    False) and PEFT's LoRA variants other than DoRA and MiCA (aLoRA, Arrow, ...: not plain LoRA, so
    not supported by the fused layers)."""
    name = adapter_name or (layer.active_adapters[0] if layer.active_adapters else None)
    emb = len(getattr(layer, "lora_embedding_A", {})) > 0  # PEFT's Embedding keeps bare Parameters there
    pool = layer.lora_embedding_A if emb else layer.lora_A
    if name is None or name not in pool:
        raise ValueError(f"from_peft_layer: adapter {name!r} not in {list(pool.keys())}")
    magnitude = None
    if getattr(layer, "use_dora", {}).get(name, False):
        m = layer.lora_magnitude_vector[name].weight
        magnitude = nn.Parameter(m.detach().clone(), requires_grad=m.requires_grad)
    bias = None
    if getattr(layer, "lora_bias", {}).get(name, False):
        if not lora_bias:
            raise NotImplementedError(
                f"from_peft_layer: LoRA bias (lora_bias=True) on PEFT's {type(layer).__name__} is not supported"
                " (the fused Linear and conv layers take it)"
            )
        lb = layer.lora_B[name].bias
        bias = nn.Parameter(lb.detach().clone(), requires_grad=lb.requires_grad)
    variant = getattr(layer, "lora_variant", {}).get(name)
    variant = variant if variant is None or isinstance(variant, type) else type(variant)
    # DoRA is built here; MiCA is plain LoRA with B frozen (copied with its requires_grad). Every other
    # variant (aLoRA, Arrow, BD-LoRA, VeLoRA, MonteCLoRA, KaSA, ...) computes something else: a plain
    # fused layer would change the outputs without a word.
    if variant is not None and not variant.__name__.startswith(("Dora", "_Dora", "MiCA")):
        raise NotImplementedError(
            f"from_peft_layer: adapter {name!r} is PEFT's {variant.__name__} (a LoRA variant whose forward is"
            " not plain LoRA); the fused layers run plain LoRA and DoRA only"
        )
    drop = layer.lora_dropout[name]
    merged = bool(getattr(layer, "merged", False)) and name in getattr(layer, "merged_adapters", [name])
    norm = getattr(layer, "_caches", {}).get(f"{name}-weight_norm")  # PEFT's [out] or [1, out, 1, 1]
    if emb:
        a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    else:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return SimpleNamespace(
        name=name,
        base=layer.get_base_layer(),
        r=layer.r[name],
        alpha=layer.lora_alpha[name],
        scaling=float(layer.scaling[name]),
        dropout=float(drop.p) if isinstance(drop, nn.Dropout) else 0.0,
        rslora=bool(getattr(layer, "use_rslora", {}).get(name, False)),
        lora_A=nn.Parameter(a.detach().clone(), requires_grad=a.requires_grad),
        lora_B=nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad),
        merged=merged,
        lora_bias=bias,
        magnitude=magnitude,
        merged_norm=norm.reshape(-1) if merged and norm is not None else None,
    )
