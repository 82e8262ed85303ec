"""``MaskedLinear`` / ``MaskedConv2d``: layers whose weight trains only where a structured mask
says, and whose backward computes the weight gradient only there.

The mask (True = trainable) is also registered with :func:`ftkernels.set_grad_mask`, so the fused
optimizers leave frozen elements and their state bit-identical (no weight decay, no momentum
drift). Structure is detected from the mask:

- ``rows``: whole output rows (Linear) / output channels (Conv2d): grad_W of the kept rows is one
  GEMM (one weight-gradient conv) on the gathered kept columns of the output gradient, so a
  10%-trainable layer pays ~10% of the weight-gradient flops;
- ``blocks`` (Linear): square tiles of 32 or 16 (``masks.blocks``): per block row, one GEMM over
  the gathered columns of x that its kept tiles cover;
- ``elements``: any other mask: the dense weight gradient, multiplied by the mask.

grad_x is always the exact, unmasked ``g W``. The bias trains where its output row has any
trainable weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._route import Route
from ..masks import set_grad_mask
from ..ops import torch_func
from ..ops._autograd import unviewed
from ._conv_stride import conv_backward
from ._lora_common import check_plain_base


def _check_mask(mask: Tensor, weight: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = trainable), got {mask.dtype}")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"mask is on {mask.device}, the weight on {weight.device}")
    return mask


def _plan(mask: Tensor) -> dict:
    """How to compute the masked weight gradient for this mask (see the module doc)."""
    n = mask.shape[0]
    flat = mask.reshape(n, -1)
    row_any, row_all = flat.any(1), flat.all(1)
    if torch.equal(row_any, row_all):
        rows = row_any.nonzero().flatten()
        inv = torch.full((n,), -1, dtype=torch.int32, device=mask.device)  # row -> its place in rows, or -1
        inv[rows] = torch.arange(rows.numel(), dtype=torch.int32, device=mask.device)
        return {"kind": "rows", "rows": rows, "gather": _gather_index(rows), "inv": inv,
                "zrows": (~row_any).nonzero().flatten(), "bias": row_any}  # fmt: skip
    if mask.dim() == 2:
        r, c = mask.shape
        for bs in (32, 16):
            tr, tc = -(-r // bs), -(-c // bs)
            pad = torch.zeros(tr * bs, tc * bs, dtype=torch.bool, device=mask.device)
            real = torch.zeros_like(pad)
            pad[:r, :c], real[:r, :c] = mask, True
            tiles, real_tiles = pad.view(tr, bs, tc, bs), real.view(tr, bs, tc, bs)
            t_any = tiles.any(dim=(1, 3))
            t_all = (tiles | ~real_tiles).all(dim=(1, 3)) & t_any  # edge tiles: only their real part counts
            if torch.equal(t_any, t_all):
                groups = []
                for bi in range(tr):
                    cols = t_any[bi].nonzero().flatten()
                    if cols.numel():
                        idx = (cols[:, None] * bs + torch.arange(bs, device=mask.device)).flatten()
                        groups.append((bi * bs, min(r, bi * bs + bs), idx[idx < c]))
                return {"kind": "blocks", "block": bs, "groups": groups, "bias": row_any}
    return {"kind": "elements", "mask": mask, "bias": row_any}


def _plan_mask(plan: dict, shape) -> Tensor:
    """The plan's mask as a bool tensor broadcasting to the weight's ``shape``."""
    if "mask" in plan:
        return plan["mask"]
    if plan["kind"] == "rows":
        return plan["bias"].view(-1, *[1] * (len(shape) - 1))
    mask = torch.zeros(shape, dtype=torch.bool, device=plan["bias"].device)
    for r0, r1, cols in plan["groups"]:
        mask[r0:r1, cols] = True
    return mask


def _masked_params(weight: Tensor, bias: Tensor | None, plan: dict) -> tuple[Tensor, Tensor | None]:
    """weight and bias whose gradients are kept only where the plan trains (``torch.func`` transforms)."""
    w = torch_func.masked_param(weight, _plan_mask(plan, weight.shape))
    return w, None if bias is None else torch_func.masked_param(bias, plan["bias"])


def _second_order_weight(weight: Tensor, plan: dict) -> Tensor:
    """The weight grad_x is computed from. Under ``create_graph=True`` (grad mode on in backward) grad_x
    is differentiated again, and its direct term ``g W`` would carry a second-order gradient into the
    frozen elements: the weight then enters with its gradient kept where the plan trains, as on the
    plain path. Otherwise the weight itself."""
    return torch_func.masked_param(weight, _plan_mask(plan, weight.shape)) if torch.is_grad_enabled() else weight


def _gather_index(rows: Tensor) -> Tensor:
    """``rows`` padded to a multiple of 8 by repeating its last entry. The gathered columns of g are
    the GEMM's left operand with leading dimension len(index): a multiple of 8 gives 16-byte aligned
    rows in 16-bit types, which cuBLAS's TMA (Hopper) kernels need. With 409 kept rows the GEMM took
    256 us on an H100, padded to 416 65 us (bench/NOTES.md, session 7)."""
    pad = -rows.numel() % 8
    return torch.cat([rows, rows[-1:].expand(pad)]) if pad and rows.numel() else rows


def _gather_for(plan: dict, t: Tensor) -> Tensor:
    """The kept rows padded to 8 on CUDA (16-byte rows for cuBLAS/cuDNN), as they are elsewhere: on
    CPU the padding is only extra flops (0.5 ms of 4.4 at M2048, K=N=1024, 10% rows)."""
    return plan["gather"] if t.is_cuda else plan["rows"]


def _bias_from_kept(sums: Tensor, plan: dict, n: int) -> Tensor:
    """The bias gradient ``[n]`` of a rows plan from the sums of g's gathered kept rows/channels
    (``sums`` may carry the padding of :func:`_gather_for` at its end): zero elsewhere."""
    rows = plan["rows"]
    return sums.new_zeros(n).index_copy_(0, rows, sums[: rows.numel()])


def _rows_torch(g2: Tensor, x2: Tensor, plan: dict, shape):
    """Gather of g's kept columns (padded on CUDA: :func:`_gather_for`), one GEMM, zero fill and index_copy.
    Returns (grad_W, the gathered g ``[M, >= NR]``, the dim to sum it over for the bias)."""
    rows = plan["rows"]
    gw = g2.new_zeros(shape)
    gc = g2.index_select(1, _gather_for(plan, g2))
    if rows.numel():
        gw.index_copy_(0, rows, (gc.t() @ x2)[: rows.numel()])
    return gw, gc, 0


def _rows_split(g2: Tensor, x2: Tensor, plan: dict, shape):
    """Triton gather of g's kept columns transposed, cuBLAS GEMM, one-pass Triton fill of grad_W."""
    from ..triton.masked import fill_rows, gather_t

    gt = gather_t(g2, plan["rows"])
    return fill_rows(gt @ x2, plan["inv"], shape, g2.dtype), gt, 1


def _rows_fused(g2: Tensor, x2: Tensor, plan: dict, shape):
    """Triton gather, then one Triton GEMM writing the kept rows in place and zeroing the others."""
    from ..triton.masked import gather_t, rows_gemm

    gt = gather_t(g2, plan["rows"])
    return rows_gemm(gt, x2, plan["rows"], plan["zrows"], shape), gt, 1


_ROWS = {"fused": _rows_fused, "split": _rows_split, "torch": _rows_torch}

# How a rows-mode weight gradient runs on GPU (``FTKERNELS_MASKED_WGRAD``): ``auto`` times the three
# once per shape and keeps the fastest; CPU always takes ``torch``.
ROWS_WGRAD_ROUTE = Route("FTKERNELS_MASKED_WGRAD", tuple(_ROWS), default="auto", safe="torch")


def _rows_route(g2: Tensor, x2: Tensor, plan: dict, shape) -> str:
    setting = ROWS_WGRAD_ROUTE.setting()
    if g2.device.type != "cuda" or g2.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return "torch"  # the Triton GEMM serves the tensor-core dtypes only (fp64: ATen)
    key = (g2.shape[0], tuple(shape), plan["rows"].numel(), g2.dtype)
    candidates = {name: (lambda f=f: f(g2, x2, plan, shape)) for name, f in _ROWS.items()}
    return ROWS_WGRAD_ROUTE.pick(key, candidates, setting)


def wgrad_choices() -> dict[tuple, str]:
    """The per-shape routes picked so far (key: M, weight shape, kept rows, dtype)."""
    return ROWS_WGRAD_ROUTE.chosen()


def masked_grads_linear(g2: Tensor, x2: Tensor, plan: dict, shape, need_w: bool = True, need_b: bool = False):
    """(grad_W ``[N, K]``, grad_b ``[N]``) of ``y = x W^T + b`` for g ``[M, N]``, x ``[M, K]``, zero
    outside the plan (None where not needed). In rows mode the bias gradient sums the gathered kept
    columns of g, not all of g."""
    gw = gb = None
    if need_w and plan["kind"] == "rows":
        gw, kept, dim = _ROWS[_rows_route(g2, x2, plan, shape)](g2, x2, plan, shape)
        if need_b:
            gb = _bias_from_kept(kept.sum(dim), plan, shape[0])
        return gw, gb
    if need_w and plan["kind"] == "elements":
        gw = (g2.t() @ x2).mul_(plan["mask"])
    elif need_w:
        gw = g2.new_zeros(shape)
        for r0, r1, cols in plan["groups"]:
            gw[r0:r1].index_copy_(1, cols, g2[:, r0:r1].t() @ x2.index_select(1, cols))
    if need_b:
        gb = g2.sum(0).mul_(plan["bias"])
    return gw, gb


def masked_weight_grad_linear(g2: Tensor, x2: Tensor, plan: dict, shape) -> Tensor:
    """grad_W ``[N, K]`` of ``y = x W^T`` for g ``[M, N]``, x ``[M, K]``, zero outside the plan."""
    return masked_grads_linear(g2, x2, plan, shape)[0]


class _MaskedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, plan):
        ctx.save_for_backward(x, weight)
        ctx.plan = plan
        return unviewed(F.linear(x, weight, bias))  # a [..., K] x gives a view of the GEMM's 2-D output

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g2 = g.reshape(-1, g.shape[-1])
        wx = _second_order_weight(weight, plan)
        grad_x = (g2 @ wx).view(x.shape) if need_x else None
        grad_w, grad_b = masked_grads_linear(g2, x.reshape(-1, x.shape[-1]), plan, weight.shape, need_w, need_b)
        return grad_x, grad_w, grad_b, None


class MaskedLinear(nn.Linear):
    """``nn.Linear`` (a subclass: drop-in) whose weight trains only where ``mask`` is True.

    ``y = x W^T + b`` as usual; backward gives the exact grad_x and ``grad_W = (g^T x) * mask``
    computed only over the mask's rows or tiles (see the module doc). Build one with
    :meth:`from_linear` (shares the parameters) or the ``nn.Linear`` constructor plus ``mask=``.
    """

    def __init__(self, in_features, out_features, bias=True, mask: Tensor | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.plan = None
        if mask is not None:
            self.set_mask(mask)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Tensor) -> MaskedLinear:
        """A ``MaskedLinear`` sharing ``linear``'s weight and bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        check_plain_base("MaskedLinear.from_linear", linear, nn.Linear)
        # Built on the meta device (no allocation), then given the original parameters.
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.set_mask(mask)
        return new

    def set_mask(self, mask: Tensor) -> None:
        """Use ``mask`` (bool, the weight's shape, True = trainable); registers it for the fused optimizers."""
        mask = _check_mask(mask, self.weight)
        self.plan = _plan(mask)
        set_grad_mask(self.weight, mask)
        if self.bias is not None:
            set_grad_mask(self.bias, self.plan["bias"])

    def forward(self, x: Tensor) -> Tensor:
        """x ``[..., in]`` -> ``x W^T + b`` ``[..., out]``, as ``nn.Linear``; only backward differs."""
        if self.plan is None:
            return super().forward(x)
        if torch_func.active():  # no autograd node runs under a torch.func transform
            w, b = _masked_params(self.weight, self.bias, self.plan)
            return F.linear(x, w, b)
        return _MaskedLinearFn.apply(x, self.weight, self.bias, self.plan)

    def extra_repr(self) -> str:
        kind = self.plan["kind"] if self.plan else "none"
        return f"{super().extra_repr()}, mask={kind}"


class _MaskedConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, plan, geom):
        stride, padding, dilation, groups = geom
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.geom = plan, geom
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        plan, (stride, padding, dilation, groups) = ctx.plan, ctx.geom
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        rows_only = plan["kind"] == "rows" and groups == 1
        if need_x or (need_w and not rows_only):
            mask = [need_x, need_w and not rows_only, False]
            grad_x, grad_w, _ = conv_backward(g, x, _second_order_weight(weight, plan), None, ctx.geom, mask)
            if grad_w is not None:
                grad_w = grad_w.mul_(plan["mask"])
        kept = None  # g's kept channels, when the weight gradient gathered them
        if need_w and rows_only:
            rows, gather = plan["rows"], _gather_for(plan, g)
            grad_w = weight.new_zeros(weight.shape)
            kept = g.index_select(1, gather)
            if rows.numel():
                sel = weight.index_select(0, gather)
                _, gw, _ = conv_backward(kept, x, sel, None, (stride, padding, dilation, 1), [False, True, False])
                grad_w.index_copy_(0, rows, gw[: rows.numel()])
        if need_b and kept is not None:  # the kept channels' sums only: a read of the gathered part of g
            grad_b = _bias_from_kept(kept.sum((0, 2, 3)), plan, g.shape[1])
        elif need_b:
            grad_b = g.sum((0, 2, 3)).mul_(plan["bias"])
        return grad_x, grad_w, grad_b, None, None


class MaskedConv2d(nn.Conv2d):
    """``nn.Conv2d`` (a subclass: drop-in) whose weight trains only where ``mask`` is True.

    With whole output channels kept (``masks.rows``), grad_W is one weight-gradient conv over the
    kept channels of the output gradient (~the kept fraction of the flops; groups=1); other masks
    take the dense weight gradient times the mask. grad_x is exact.
    """

    def __init__(self, *args, mask: Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = None
        if mask is not None:
            self.set_mask(mask)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: Tensor) -> MaskedConv2d:
        """A ``MaskedConv2d`` sharing ``conv``'s weight and bias."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv takes an nn.Conv2d, got {type(conv).__name__}")
        check_plain_base("MaskedConv2d.from_conv", conv, nn.Conv2d, ("forward", "_conv_forward"))
        # Built on the meta device (no allocation), then given the original parameters; nothing else
        # (hooks, buffers) is shared with ``conv``.
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device="meta",
        )  # fmt: skip
        new.weight, new.bias = conv.weight, conv.bias
        new.set_mask(mask)
        return new

    def set_mask(self, mask: Tensor) -> None:
        """Use ``mask`` (bool, the weight's shape, True = trainable); registers it for the fused optimizers."""
        if self.padding_mode != "zeros":
            raise ValueError(f"MaskedConv2d: padding_mode={self.padding_mode!r} is unsupported (zeros only)")
        if isinstance(self.padding, str):
            raise ValueError("MaskedConv2d: give padding as numbers, not 'same'/'valid'")
        mask = _check_mask(mask, self.weight)
        plan = _plan(mask)  # rows (whole output channels) or elements: tiles are detected for 2-D weights only
        plan["mask"] = mask  # the dense weight gradient (non-rows masks, groups > 1) is multiplied by it
        self.plan = plan
        set_grad_mask(self.weight, mask)
        if self.bias is not None:
            set_grad_mask(self.bias, plan["bias"])

    def forward(self, x: Tensor) -> Tensor:
        """x ``[N, C_in, H, W]`` -> ``conv2d(x, W) + b``, as ``nn.Conv2d``; only backward differs."""
        if self.plan is None:
            return super().forward(x)
        geom = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        if torch_func.active():  # no autograd node runs under a torch.func transform
            w, b = _masked_params(self.weight, self.bias, self.plan)
            return F.conv2d(x, w, b, *geom)
        return _MaskedConvFn.apply(x, self.weight, self.bias, self.plan, geom)
