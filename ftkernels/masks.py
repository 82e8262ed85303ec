"""Element-level gradient masks (element freezing), stored as packed bits on the parameter.

A masked-out element is frozen: the fused optimizers leave its value and its optimizer state
untouched (no weight decay, no momentum drift). Bits are packed in the parameter's memory order,
little-endian within a byte: element ``i`` is bit ``i % 8`` of byte ``i // 8`` (1 = trainable).
"""

from __future__ import annotations

import warnings
import weakref

import torch

_ATTR = "_ftk_grad_mask"
# Bumped whenever any mask is set, cleared or moved, so optimizers can cache their step plans.
_version = [0]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor, in its flattened order, into ``ceil(numel / 8)`` uint8 bytes."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat bool tensor of ``numel`` elements."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.view(-1, 1) >> shifts) & 1).view(-1)[:numel].bool()


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    # A dense tensor viewed as its storage order, so bits follow the param's memory layout.
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


# Optimizers outside ftkernels step masked parameters as if unmasked (weight decay and momentum move
# masked-out elements). One global step pre-hook, installed with the first mask, says so once per
# optimizer and mask version.
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_hook = []


def _applies_masks(optimizer) -> bool:
    from .optim._fused import FusedOptimizer

    # A wrapper (Accelerate's AcceleratedOptimizer, ...) keeps the real optimizer in .optimizer, whose
    # own step runs this check.
    return isinstance(optimizer, FusedOptimizer) or isinstance(
        getattr(optimizer, "optimizer", None), torch.optim.Optimizer
    )


def _warn_if_mask_ignored(optimizer, args, kwargs) -> None:
    try:
        if _checked.get(optimizer) == _version[0]:
            return
        _checked[optimizer] = _version[0]
    except TypeError:  # not weak-referenceable: checked each step
        pass
    if _applies_masks(optimizer):
        return
    held = [p for g in optimizer.param_groups for p in g["params"] if hasattr(p, _ATTR)]
    if held:
        warnings.warn(
            f"{type(optimizer).__name__} steps {len(held)} parameter(s) holding an ftkernels gradient mask"
            f" (set_grad_mask, MaskedLinear, MaskedConv2d), e.g. a {_name(held[0])}; only ftkernels' fused"
            " optimizers (ftkernels.optim.FusedAdamW, FusedSGD, ...) apply it, this one also moves the"
            " masked-out elements (weight decay, momentum)",
            stacklevel=3,
        )


def _install_step_check() -> None:
    if not _hook:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _hook.append(register_optimizer_step_pre_hook(_warn_if_mask_ignored))


def _name(param: torch.Tensor) -> str:
    return f"parameter of shape {tuple(param.shape)} ({param.dtype}, {param.device})"


def set_grad_mask(param: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Freeze the elements of ``param`` where ``mask`` is False (``None`` clears the mask).

    ``mask``: bool tensor broadcastable to ``param.shape`` (e.g. ``(out, 1)`` for whole rows), on
    ``param``'s device. Stored as ``ceil(numel / 8)`` bytes. Applied by the fused optimizers; another
    optimizer stepping ``param`` warns (once per optimizer), as it moves masked-out elements too.
    """
    if mask is None:
        clear_grad_mask(param)
        return
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"set_grad_mask: param must be a tensor, got {type(param).__name__}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"set_grad_mask: mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"set_grad_mask: mask must have dtype torch.bool, got {mask.dtype} for {_name(param)}")
    if mask.device != param.device:
        raise ValueError(f"set_grad_mask: mask is on {mask.device} but the {_name(param)} is on {param.device}")
    try:
        torch.broadcast_shapes(mask.shape, param.shape)
        expanded = mask.expand(param.shape)
    except RuntimeError:
        raise ValueError(f"set_grad_mask: mask of shape {tuple(mask.shape)} does not fit the {_name(param)}") from None
    if type(param) is not torch.Tensor and type(param) is not torch.nn.Parameter:
        raise NotImplementedError(f"set_grad_mask: {type(param).__name__} parameters are not supported yet")
    laid_out = torch.empty_like(param, dtype=torch.bool).copy_(expanded)
    setattr(param, _ATTR, pack_bits(_memory_order(laid_out)))
    _version[0] += 1
    _install_step_check()


def clear_grad_mask(param: torch.Tensor) -> None:
    """Remove the gradient mask of ``param`` (all elements trainable again)."""
    if hasattr(param, _ATTR):
        delattr(param, _ATTR)
        _version[0] += 1


def get_grad_mask(param: torch.Tensor) -> torch.Tensor | None:
    """The mask set on ``param`` as a bool tensor of its shape, or None."""
    bits = getattr(param, _ATTR, None)
    if bits is None:
        return None
    flat = unpack_bits(bits, param.numel())
    out = torch.empty_like(param, dtype=torch.bool)
    _memory_order(out).copy_(flat.to(out.device))
    return out


def mask_version() -> int:
    """A counter that changes whenever any gradient mask is set, cleared or moved."""
    return _version[0]


def packed_grad_mask(param: torch.Tensor) -> torch.Tensor | None:
    """The packed bits of ``param``'s mask on ``param``'s device (moved there if the param moved)."""
    bits = getattr(param, _ATTR, None)
    if bits is None:
        return None
    if bits.numel() != (param.numel() + 7) // 8:
        raise ValueError(f"the gradient mask of the {_name(param)} no longer fits it; set it again")
    if bits.device != param.device:
        bits = bits.to(param.device)
        setattr(param, _ATTR, bits)
        _version[0] += 1
    return bits


# ---------------------------------------------------------------- mask builders
# Each returns a bool tensor of the param's shape (True = trainable) for set_grad_mask.


def _check_keep(keep: float) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not (0 < keep <= 1):
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
    return float(keep)


def _count(numel: int, keep: float) -> int:
    return max(1, min(numel, round(keep * numel)))


def _top(scores: torch.Tensor, k: int, what: str | None = None) -> torch.Tensor:
    """Bool mask of the k largest scores (flat order ties broken by position). ``what`` names the
    scores' source when they come from data: NaN or inf there raises (topk would rank NaN first)."""
    flat = scores.reshape(-1)
    if what is not None:
        bad = int((~torch.isfinite(flat)).sum())
        if bad:
            raise ValueError(f"{what} has {bad} non-finite (NaN/inf) values of {flat.numel()}: nothing to rank by")
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    out[torch.topk(flat, k, sorted=False).indices] = True
    return out.view(scores.shape)


def random(param: torch.Tensor, keep: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exactly ``round(keep * numel)`` (at least 1) elements kept, uniformly at random."""
    keep = _check_keep(keep)
    scores = torch.rand(param.shape, generator=generator, device="cpu").to(param.device)
    return _top(scores, _count(param.numel(), keep))


def magnitude(param: torch.Tensor, keep: float) -> torch.Tensor:
    """The ``round(keep * numel)`` elements of largest ``|param|`` kept."""
    keep = _check_keep(keep)
    return _top(param.detach().abs().float(), _count(param.numel(), keep), f"magnitude: the {_name(param)}")


def rows(
    param: torch.Tensor,
    indices=None,
    keep: float | None = None,
    by: str = "magnitude",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Whole output rows (dim 0: a Linear's output features, a Conv2d's output channels) kept.

    Either explicit ``indices`` or a fraction ``keep`` of the rows, chosen ``by`` "magnitude"
    (largest L2 norm) or "random".
    """
    if param.dim() < 1:
        raise ValueError("rows: the param needs at least one dimension")
    n = param.shape[0]
    if (indices is None) == (keep is None):
        raise ValueError("rows: give exactly one of indices or keep")
    if indices is not None:
        idx = torch.as_tensor(indices, dtype=torch.long, device=param.device).reshape(-1)
        if idx.numel() and (idx.min() < -n or idx.max() >= n):
            raise ValueError(f"rows: indices out of range for {n} rows")
        chosen = torch.zeros(n, dtype=torch.bool, device=param.device)
        chosen[idx] = True
    else:
        k = _count(n, _check_keep(keep))
        if by == "magnitude":
            score = param.detach().float().reshape(n, -1).norm(dim=1)
            what = f"rows: the {_name(param)}"
        elif by == "random":
            score, what = torch.rand(n, generator=generator).to(param.device), None
        else:
            raise ValueError(f"rows: by must be 'magnitude' or 'random', got {by!r}")
        chosen = _top(score, k, what)
    return chosen.view(n, *([1] * (param.dim() - 1))).expand(param.shape).clone()


def blocks(
    param: torch.Tensor, keep: float, block: int = 16, by: str = "magnitude", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Square ``block x block`` tiles of a 2-D param kept (edge tiles may be smaller): the
    ``round(keep * tiles)`` tiles of largest mean ``|w|``, or random ones (``by="random"``)."""
    if param.dim() != 2:
        raise ValueError(f"blocks: needs a 2-D param, got shape {tuple(param.shape)}")
    if block < 1:
        raise ValueError(f"blocks: block must be >= 1, got {block}")
    keep = _check_keep(keep)
    r, c = param.shape
    tr, tc = -(-r // block), -(-c // block)
    if by == "magnitude":
        a = param.detach().abs().float()
        padded = torch.zeros(tr * block, tc * block, device=param.device)
        counts = torch.zeros_like(padded)
        padded[:r, :c] = a
        counts[:r, :c] = 1
        fold = lambda t: t.view(tr, block, tc, block).sum(dim=(1, 3))  # noqa: E731
        score, what = fold(padded) / fold(counts), f"blocks: the {_name(param)}"
    elif by == "random":
        score, what = torch.rand(tr, tc, generator=generator).to(param.device), None
    else:
        raise ValueError(f"blocks: by must be 'magnitude' or 'random', got {by!r}")
    tiles = _top(score, _count(tr * tc, keep), what)
    return tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:r, :c].contiguous()


def fisher_topk(model, batches, loss_fn=None, keep: float = 0.1, per_layer: bool = False) -> dict:
    """Child-Tuning-D / FISH-mask: keep the elements with the largest diagonal Fisher.

    ``keep`` is the fraction kept over all trainable params together (``per_layer=False``) or in
    each param separately. Returns ``{param: bool mask}`` for every trainable param.
    """
    from .fisher import fisher_diagonal

    keep = _check_keep(keep)
    fisher = fisher_diagonal(model, batches, loss_fn)
    if per_layer:
        return {
            p: _top(f.float(), _count(f.numel(), keep), f"fisher_topk: the Fisher of the {_name(p)}")
            for p, f in fisher.items()
        }
    flat = torch.cat([f.float().reshape(-1).cpu() for f in fisher.values()])
    chosen = _top(flat, _count(flat.numel(), keep), "fisher_topk: the Fisher diagonal")
    out, start = {}, 0
    for p, f in fisher.items():
        out[p] = chosen[start : start + f.numel()].view(f.shape).to(p.device)
        start += f.numel()
    return out
