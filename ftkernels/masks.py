"""Element-level gradient masks (element freezing), stored as packed bits on the parameter.

A masked-out element is frozen: the fused optimizers leave its value and its optimizer state
untouched (no weight decay, no momentum drift). Bits are packed in the parameter's memory order,
little-endian within a byte: element ``i`` is bit ``i % 8`` of byte ``i // 8`` (1 = trainable).
"""

from __future__ import annotations

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


def _name(param: torch.Tensor) -> str:
    return f"parameter of shape {tuple(param.shape)} ({param.dtype}, {param.device})"


def set_grad_mask(param: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Freeze the elements of ``param`` where ``mask`` is False (``None`` clears the mask).

    ``mask``: bool tensor broadcastable to ``param.shape`` (e.g. ``(out, 1)`` for whole rows), on
    ``param``'s device. Stored as ``ceil(numel / 8)`` bytes. Applied by the fused optimizers.
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
