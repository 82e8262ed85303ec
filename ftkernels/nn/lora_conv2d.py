"""``LoRAConv2d``: a frozen ``nn.Conv2d`` plus a LoRA adapter (PEFT's conv LoRA), two strategies.

The machinery is written for any number of spatial dims (:class:`LoRAConvNd`); ``nn.Conv1d`` and
``nn.Conv3d`` get their layers from it in :mod:`ftkernels.nn.lora_conv_nd`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..integrations import opacus as _dp
from ..ops import torch_func
from ..ops.lora_dropout import lora_dropout, lora_dropout_nograd
from ..ops.lora_linear import _as
from ._conv_stride import conv_backward, unit_stride
from ._lora_common import (
    LoRAMergeMixin,
    adapter_dtype,
    check_plain_base,
    lora_scaling,
    new_lora_bias,
    pad_list,
    peft_adapter,
    rng_kept,
    tf_same_pad,
)
from .dora import dora_apply_scale, dora_dropout_form, dora_scale
from .lora_linear import _compute_dtype, call_seed

STRATEGIES = ("auto", "unmerged", "merged")
CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by the number of spatial dims


def conv_nd(x: Tensor, *args) -> Tensor:
    """``F.conv1d`` / ``conv2d`` / ``conv3d`` by x's spatial dims (x batched: ``[N, C, *S]``)."""
    return CONV_FNS[x.dim() - 2](x, *args)


def _rank_update_(y: Tensor, u: Tensor, lora_b: Tensor, scaling: float, groups: int) -> None:
    """``y += scaling * B u`` over channels (a 1x1 conv with ``groups``), in place: one GEMM with
    beta=1 on y's own storage, no full-size temporary. y ``[N, out, *S]``, u ``[N, r, *S]`` (S: 1 to 3
    spatial dims), B ``[out, r / groups, 1, ...]`` (group g maps u's channels g*r/G.. to y's g*out/G..)."""
    n, out = y.shape[:2]
    r = u.shape[1]
    if groups == 1 and y.movedim(1, -1).is_contiguous() and not y.is_contiguous():
        y2 = y.movedim(1, -1).view(-1, out)  # a view: channels-last rows are pixels
        y2.addmm_(u.movedim(1, -1).reshape(-1, r), lora_b.view(out, r).t(), alpha=scaling)
    elif y.is_contiguous():
        # [N*G, out/G, P] += [N*G, out/G, r/G] @ [N*G, r/G, P]: y's groups are contiguous blocks.
        og, rg, pix = out // groups, r // groups, y.shape[2:].numel()
        b3 = lora_b.view(groups, og, rg)
        b3 = b3.expand(n, groups, og, rg).reshape(n * groups, og, rg) if groups > 1 else b3.expand(n, og, rg)
        y.view(n * groups, og, pix).baddbmm_(b3, u.reshape(n * groups, rg, pix), alpha=scaling)
    else:
        y.add_(conv_nd(u, lora_b, None, 1, 0, 1, groups), alpha=scaling)


class _UnmergedConv(torch.autograd.Function):
    """Base conv plus the low-rank path, the dropout stream fused in (D(x) exists only while the
    A-conv runs, in forward and again for grad_A in backward; it is never saved).

    Forward: ``y = conv(x, W, b)``, ``u = conv(D(x), A)``, ``y += s B u`` in place (W and B grouped
    as the base conv is, A never). geom: ``(stride, padding, dilation, groups)``.
    Backward: ``gu = s B^T g``; ``grad_B = s sum g u^T``; ``grad_A = wgrad(D(x), gu)``;
    ``grad_x = dgrad(g, W) + D(dgrad(gu, A))`` (D is its own adjoint). Saved: x, u (r channels), seed.
    Adapters of another dtype than x (fp32 on a bf16 base) are cast inside and get grads in their
    own dtype: one autograd node per layer, no cast nodes.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout, seed, geom):
        stride, padding, dilation, groups = geom
        y = conv_nd(x, weight, bias, stride, padding, dilation, groups)
        xd = lora_dropout_nograd(x, dropout, seed) if dropout > 0 else x
        u = conv_nd(xd, _as(lora_a, x.dtype), None, stride, padding, dilation)  # A is never grouped
        del xd
        _rank_update_(y, u, _as(lora_b, x.dtype), scaling, groups)
        ctx.save_for_backward(x, weight, lora_a, lora_b, u, seed)
        ctx.scaling, ctx.dropout, ctx.geom = scaling, dropout, geom
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, lora_a0, lora_b0, u, seed = ctx.saved_tensors
        lora_a, lora_b = _as(lora_a0, x.dtype), _as(lora_b0, x.dtype)
        s, p, (stride, padding, dilation, groups) = ctx.scaling, ctx.dropout, ctx.geom
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        # One aten.convolution_backward per conv (conv_backward: two for a weight grad that oneDNN
        # gets wrong), each producing the grads it is asked for (what autograd would run), with s
        # applied to the r-channel results instead of to g.
        bwd = torch.ops.aten.convolution_backward.default
        # create_graph=True: grads of grads go through this backward, so the dropout must be the
        # differentiable op (the direct kernel call is invisible to autograd: a wrong second order)
        drop = lora_dropout if torch.is_grad_enabled() else lora_dropout_nograd
        one, zero = [1] * len(stride), [0] * len(stride)
        gu, grad_b, _ = bwd(g, u, lora_b, None, one, zero, one, False, zero, groups, [True, need_b, False])
        gu.mul_(s)
        grad_b = _as(grad_b.mul_(s), lora_b0.dtype) if need_b else None
        xd = drop(x, p, seed) if p > 0 and need_a else x
        t, grad_a, _ = conv_backward(gu, xd, lora_a, None, (stride, padding, dilation, 1), [need_x, need_a, False])
        del xd
        grad_x = grad_w = grad_bias = None
        if need_x or need_w or need_bias:
            bias_sizes = [weight.shape[0]] if need_bias else None
            grad_x, grad_w, grad_bias = conv_backward(g, x, weight, bias_sizes, ctx.geom, [need_x, need_w, need_bias])
        if need_x:
            grad_x.add_(drop(t, p, seed) if p > 0 else t)
        grad_a = _as(grad_a, lora_a0.dtype) if need_a else None
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None


def merged_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """``W + scaling * B A`` with A ``[r, in, *k]`` flattened to ``[r, in * prod(k)]`` and B ``[out, r, 1, ...]``."""
    r = lora_a.shape[0]
    delta = lora_b.reshape(lora_b.shape[0], r) @ lora_a.reshape(r, -1)
    return weight + scaling * delta.view_as(weight)


def choose_strategy(x: Tensor, weight: Tensor, r: int, geom, dropout: float, grad: bool) -> str:
    """The strategy for one call: ``unmerged`` whenever dropout is on; ``merged`` without autograd
    (one conv). Training without dropout: ``merged`` pays a full weight-gradient conv to skip the
    rank-r convs and their passes over x and y: its extra cost grows with ``in * out`` per pixel,
    what it saves with ``in + out``. Measured on ResNet-50's residual convs (bench/NOTES.md "LoRA
    Conv2d"): on CPU (batch 8 at 112x112) merged wins for 1x1 convs on inputs of >= 28x28 pixels,
    and on >= 14x14 when ``in * out <= 256 * 256``; 3x3 convs and small maps stay unmerged. On an
    H100 (batch 64 at 224, bf16) merged was faster on 21 of the 22 shapes (0.67-1.04x of
    unmerged's time; the one loss within 4%): cuDNN's rank-16 convs and the extra launches cost
    more there than the weight gradient, so every non-CPU device takes ``merged``. Conv1d / Conv3d
    (x ``[N, C, *S]``) use the same rule with pixels = prod(S) (not measured separately)."""
    if dropout > 0 or x.shape[1] != weight.shape[1]:
        return "unmerged"  # a grouped base (in != W's in/groups) cannot hold the dense delta B A
    if not grad or x.device.type != "cpu":
        return "merged"
    pixels, out_c, in_c = x.shape[2:].numel(), weight.shape[0], weight.shape[1]
    merged = weight.shape[2:].numel() == 1 and (pixels >= 784 or (pixels >= 196 and in_c * out_c <= 256 * 256))
    return "merged" if merged else "unmerged"


def _geometry(base: nn.modules.conv._ConvNd):
    """``((stride, padding, dilation, groups), pre_pad)``: the conv geometry both convs take, and for
    ``padding="same"`` with an even effective kernel (torch pads it asymmetrically: ``total // 2``
    before, the rest after) the ``F.pad`` list applied to x first (padding 0 then), else None."""
    pad, pre_pad = base.padding, None
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0,) * len(base.kernel_size)
        else:  # "same", stride 1 (torch's convs enforce that)
            totals = [d * (k - 1) for d, k in zip(base.dilation, base.kernel_size, strict=True)]
            pad = tuple(t // 2 for t in totals)
            if any(t % 2 for t in totals):
                pre_pad = pad_list(totals)
                pad = (0,) * len(totals)
    return (tuple(base.stride), tuple(pad), tuple(base.dilation), int(base.groups)), pre_pad


class LoRAConvNd(LoRAMergeMixin, nn.Module):
    """LoRA on a frozen torch conv with 1 to 3 spatial dims (PEFT's ``lora._ConvNd``); subclasses fix the
    base type: :class:`LoRAConv2d`, :class:`~ftkernels.nn.LoRAConv1d`, :class:`~ftkernels.nn.LoRAConv3d`.

    ``y = base(x) + scaling * B(A(dropout(x)))``: A is a conv with the base's kernel size, stride,
    padding and dilation and r output channels (``lora_A`` ``[r, in, *k]``, Kaiming-uniform), B a
    1x1 conv to the base's channels (``lora_B`` ``[out, r / groups, 1, ...]``, zero); ``scaling =
    alpha / r`` (``alpha / sqrt(r)`` with rslora). Channels-first or channels-last inputs,
    fp32/fp16/bf16 (fp64 on CPU), autocast. Zero padding only. ``lora_bias=True``: a trained
    ``lora_bias`` ``[out]`` (PEFT's ``lora_bias``, B's conv bias), ``y += scaling * lora_bias``.

    ``dora=True``: DoRA as PEFT's ``use_dora`` (:mod:`ftkernels.nn.dora`): a trained magnitude
    ``lora_magnitude`` ``[1, out, 1, ...]`` scales each output channel by ``m / ||W + s B A||``; either
    strategy without dropout, PEFT's form (one more conv) with dropout; not on grouped convs.

    Grouped base convs (ResNeXt, depthwise) follow PEFT: A stays dense over all input channels, B
    is a 1x1 conv with the base's ``groups`` (so r must be a multiple of groups), and such a layer
    cannot be merged (``W + s B A`` is not a grouped weight): it always runs ``unmerged``.

    Strategies (``strategy=``): ``unmerged`` runs the base conv and the low-rank path with the
    dropout stream fused in (nothing full-size saved but x; y updated in place); ``merged`` (dropout
    0 only) runs one conv with ``W + s B A`` and gets the adapters' grads through its weight
    gradient. ``auto`` picks per call by :func:`choose_strategy`.

    A base that pads TensorFlow's way, per input (timm's ``Conv2dSame`` in TF-ported EfficientNet /
    MixNet / MobileNetV3), is recognised by its output on random inputs; x is then padded the same
    way before both convs (``tf_same`` is True), as PEFT's A (built as the base's class) does.

    A dilated base gives A its dilation (``W + s B A`` is then a delta on W and merges exactly).
    PEFT builds A without it, so PEFT fails on dilated convs with numeric padding, and with
    ``padding="same"`` runs an undilated A: :meth:`from_peft_layer` refuses that one case.
    """

    _plain: type[nn.modules.conv._ConvNd] = nn.Conv2d  # the torch conv this layer wraps
    _spatial = "H, W"  # for error messages

    def __init__(
        self,
        base: nn.modules.conv._ConvNd,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        rslora: bool = False,
        strategy: str = "auto",
        dora: bool = False,
        lora_bias: bool = False,
    ):
        super().__init__()
        name, plain = type(self).__name__, self._plain
        if not isinstance(base, plain):
            raise TypeError(f"{name} wraps an nn.{plain.__name__}, got {type(base).__name__}")
        # timm's Conv2dSame (TF-ported models) pads each input dynamically: the layer pads x that way
        self.tf_same = check_plain_base(name, base, plain, ("forward", "_conv_forward"), tf_same=True)
        if int(r) % base.groups:
            raise ValueError(
                f"{name}: the base conv has groups={base.groups}, so r must be a multiple of it (B is"
                f" grouped as the base, as in PEFT); got r={r}: pick another r or leave this layer out"
            )
        if base.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode={base.padding_mode!r} is unsupported (zeros only)")
        out_c, in_c, kernel = base.weight.shape[0], base.in_channels, base.weight.shape[2:]  # A spans every channel
        ones = (1,) * len(kernel)
        scaling = lora_scaling(name, r, alpha, dropout, rslora)
        if strategy not in STRATEGIES:
            raise ValueError(f"{name}: strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.dropout, self.rslora, self.strategy = int(r), alpha, float(dropout), rslora, strategy
        self.scaling = scaling
        self.geom, self._pre_pad = _geometry(base)
        w = base.weight
        dtype = adapter_dtype(w)
        self.lora_A = nn.Parameter(torch.empty(self.r, in_c, *kernel, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_c, self.r // base.groups, *ones, device=w.device, dtype=dtype))
        if lora_bias:  # PEFT's lora_B conv bias [out]
            self.lora_bias = new_lora_bias(name, out_c, w.device, dtype, dora)
        if dora:
            if base.groups != 1:
                raise ValueError(f"{name}: DoRA on a grouped conv is unsupported (B A is not a grouped weight)")
            # PEFT's magnitude shape for convs: [1, out, 1, ...]; set by reset_parameters
            self.lora_magnitude = nn.Parameter(torch.empty(1, out_c, *ones, device=w.device, dtype=dtype))
        self.merged = False
        self.reset_parameters()
        self.last_strategy: str | None = None

    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)
    in_channels = property(lambda self: self.base.in_channels)
    out_channels = property(lambda self: self.base.out_channels)
    # Read by models around the conv (HF MobileNet's TF "same" padding reads stride and kernel_size).
    kernel_size = property(lambda self: self.base.kernel_size)
    stride = property(lambda self: self.base.stride)
    padding = property(lambda self: self.base.padding)
    dilation = property(lambda self: self.base.dilation)
    groups = property(lambda self: self.base.groups)
    padding_mode = property(lambda self: self.base.padding_mode)

    def _channel_view(self) -> tuple[int, ...]:
        """``(1, -1, 1, ...)``: a per-output-channel vector broadcast over ``[N, out, *S]``."""
        return (1, -1) + (1,) * len(self.base.kernel_size)  # (not weight.dim(): a weight-normed read costs a pass)

    def forward(self, x: Tensor) -> Tensor:
        """x ``[N, C_in, *S]`` (or unbatched ``[C_in, *S]``; S the base's 1 to 3 spatial dims) ->
        ``base(x) + scaling * conv_B(conv_A(dropout(x)))``, ``[N, C_out, *S']`` (the base alone when merged or
        disabled).
        """
        if self.merged or self.disabled:
            return self.base(x)
        if self._forward_hooks:
            _dp.hooked(self)  # Opacus: its per-sample rule for this layer (refuses dropout) is registered
        # the weight read once (a weight-normed base computes it at each read)
        weight, bias = self.base.weight, self.base.bias
        name, nd = type(self).__name__, weight.dim() - 2
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name}: x must be a floating tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() not in (nd + 1, nd + 2) or x.shape[-nd - 1] != self.in_channels:
            raise ValueError(f"{name}: x has shape {tuple(x.shape)}, expected [N, {self.in_channels}, {self._spatial}]")
        if x.device != weight.device:
            raise ValueError(f"{name}: x is on {x.device} but the layer is on {weight.device}")
        unbatched = x.dim() == nd + 1
        if unbatched:
            x = x.unsqueeze(0)
        dtype = _compute_dtype(x, weight, name)
        xc, w, b = (_as(t, dtype) for t in (x, weight, self._bias_with_lora(bias)))
        if self.tf_same:  # base and A alike (PEFT's A is the base's class, so it pads so too)
            xc = tf_same_pad(xc, self.base.kernel_size, self.base.stride, self.base.dilation)
        elif self._pre_pad is not None:  # padding="same", even kernel: torch's asymmetric padding
            xc = F.pad(xc, self._pre_pad)
        a, bb = self.lora_A, self.lora_B  # cast inside the unmerged node (no cast nodes)
        p = self.dropout if self.training else 0.0
        strategy = self.strategy
        if strategy == "auto":
            strategy = choose_strategy(xc, w, self.r, self.geom, p, torch.is_grad_enabled())
        elif strategy == "merged" and p > 0:
            raise ValueError(f"{name}: strategy='merged' needs dropout 0 (or eval mode)")
        elif strategy == "merged" and not self.can_merge:
            raise ValueError(f"{name}: strategy='merged' needs an ungrouped base (groups={self.base.groups})")
        self.last_strategy = strategy
        if self.dora and p > 0:
            y = self._dora_dropout_forward(xc, w, b, a, bb, p, weight)
        else:
            zb = None if self.dora else b  # DoRA scales the bias-free output, then adds b
            if strategy == "merged":  # no dropout: a strided 1x1 conv may take the pixels it reads
                merged = merged_weight(w, _as(a, dtype), _as(bb, dtype), self.scaling)
                xm, (st, pad, dil, _) = unit_stride(xc, merged, self.geom)
                y = conv_nd(xm, merged, zb, st, pad, dil)
            else:
                seed = call_seed(p, x.device)
                if torch_func.active():  # no autograd node runs under a torch.func transform
                    conv = CONV_FNS[xc.dim() - 2]
                    y = torch_func.lora_conv(conv, xc, w, zb, a, bb, self.scaling, p, seed, self.geom)
                else:
                    y = _UnmergedConv.apply(xc, w, zb, a, bb, self.scaling, p, seed, self.geom)
            if self.dora:
                y = dora_apply_scale(y, self._dora_mns(weight), None if b is None else b.view(self._channel_view()))
        return y.squeeze(0) if unbatched else y

    def _dora_mns(self, weight: Tensor) -> Tensor:
        """DoRA's ``m / ||W + s B A||`` per output channel, ``[1, out, 1, ...]`` (gradient to m only);
        weight: the base weight as read by this call."""
        return dora_scale(self.lora_magnitude.reshape(-1), *self._dora_operands(weight)).view(self._channel_view())

    def _dora_dropout_forward(self, xc, w, b, a, bb, p, weight) -> Tensor:
        """DoRA with dropout in training: PEFT's form (:func:`ftkernels.nn.dora.dora_dropout_form`), one
        more conv than LoRA."""
        dtype = xc.dtype
        seed = call_seed(p, xc.device)  # the stream over all of x, then maybe the strided view
        xd = torch_func.dropped(xc, p, seed) if torch_func.active() else lora_dropout(xc, p, seed)
        (xd, (stride, padding, dilation, _)), xc = unit_stride(xd, a, self.geom), unit_stride(xc, a, self.geom)[0]
        lora = conv_nd(conv_nd(xd, _as(a, dtype), None, stride, padding, dilation), _as(bb, dtype))
        base_out, t = conv_nd(xc, w, b, stride, padding, dilation), conv_nd(xd, w, None, stride, padding, dilation)
        return dora_dropout_form(base_out, t, lora, self._dora_mns(weight), self.scaling)

    @property
    def can_merge(self) -> bool:
        return self.base.groups == 1

    @classmethod
    def from_peft_layer(cls, layer, adapter_name: str | None = None, strategy: str = "auto") -> LoRAConvNd:
        """This layer over a PEFT conv LoRA layer's base layer (shared) with copies of its A and B, r,
        alpha, scaling and dropout p (and a DoRA magnitude or a LoRA bias). Raises for a dilated
        ``padding="same"`` or TF-same base, where PEFT's A runs without the dilation (so outputs would
        change)."""
        ad = peft_adapter(layer, adapter_name, lora_bias=True)
        plain = cls._plain
        if not isinstance(ad.base, plain):
            raise TypeError(f"from_peft_layer: the base layer is {type(ad.base).__name__}, not nn.{plain.__name__}")
        peft_a, base = layer.lora_A[ad.name], ad.base
        with rng_kept(base.weight.device):  # the init is overwritten below
            new = cls(base, r=ad.r, alpha=ad.alpha, strategy=strategy)
        # With static numeric padding PEFT's undilated A gives other output sizes (its layer fails);
        # with "same" or a TF-same base it runs, computing something else than the fused layer.
        same = base.padding == "same" or new.tf_same
        if same and tuple(peft_a.dilation) != tuple(base.dilation) and max(base.kernel_size) > 1:
            raise NotImplementedError(
                f"{cls.__name__}.from_peft_layer: PEFT's lora_A runs with dilation {tuple(peft_a.dilation)} on a base"
                f" conv of dilation {tuple(ad.base.dilation)}; the fused layer gives A the base's dilation (what"
                " merging assumes), so converting would change the outputs. Keep PEFT's layer for this conv"
            )
        new.dropout, new.scaling, new.rslora = ad.dropout, ad.scaling, ad.rslora
        new.lora_A, new.lora_B, new.merged = ad.lora_A, ad.lora_B, ad.merged
        if ad.magnitude is not None and ad.base.groups != 1:
            raise ValueError(f"{cls.__name__}.from_peft_layer: DoRA on a grouped conv is unsupported")
        new._adopt_peft_extras(ad)
        return new

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.base.kernel_size)}, r={self.r}, "
            f"alpha={self.alpha}, dropout={self.dropout}, strategy={self.strategy}, merged={self.merged}"
            + (f", groups={self.base.groups}" if self.base.groups > 1 else "")
            + (", dora=True" if self.dora else "")
            + (", lora_bias=True" if self.has_lora_bias else "")
        )


class LoRAConv2d(LoRAConvNd):
    """Drop-in replacement for a frozen ``nn.Conv2d`` with a LoRA adapter (PEFT's ``lora.Conv2d``):
    :class:`LoRAConvNd` on x ``[N, C, H, W]`` (NCHW or channels-last), ``lora_A`` ``[r, in, kh, kw]``,
    ``lora_B`` ``[out, r / groups, 1, 1]``, DoRA magnitude ``[1, out, 1, 1]``."""

    _plain = nn.Conv2d
    _spatial = "H, W"
