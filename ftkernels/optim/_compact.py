"""Compact optimizer state for sparse gradient masks: state only for the kept elements.

For a param whose mask (:func:`ftkernels.set_grad_mask`) keeps a fraction ``d`` of its elements,
below the optimizer's ``compact_threshold`` (default 0.5), the state slots (AdamW's moments,
SGD's momentum, ...) hold only the ``n = d * numel`` kept elements, flat, in memory order, and
``state["compact_index"]`` holds their flat indices (int32 below 2^31 elements). The fused kernel
takes the index with the state (``OptimArgs.indices``): state element k updates param, grad,
anchor and Fisher element ``idx[k]``, read and written in place (one launch, as for dense state;
gathering and scattering with torch ops cost 3 launches per param, 5-8x the dense step's time on
an H100), so every kept element gets the dense masked update exactly, and the masked ones are
not touched. AdamW state per kept element is then
8 B of moments + 4 B of index against 8 B per element dense: about ``1.5 d`` of the dense bytes.

Not compacted (the dense masked path runs): ``grad_dropout > 0`` (its Philox stream is keyed by
the element's index in the whole param), fp32 master weights of low-precision params, DTensor
params and params that are not contiguous. Anchors and Fisher diagonals (L2-SP, EWC) stay dense.
When a mask changes, the state is re-laid out: kept-to-kept elements keep their state, newly kept
ones start from the initial state; a cleared mask expands the state back to the param's shape.
"""

from __future__ import annotations

import torch

from ..masks import packed_grad_mask, unpack_bits

INDEX_KEY = "compact_index"


def wanted_index(p: torch.Tensor, group: dict, threshold: float, is_plain: bool) -> torch.Tensor | None:
    """The flat indices of ``p``'s kept elements when its state should be compact, else None."""
    bits = packed_grad_mask(p)
    if bits is None or threshold <= 0 or not is_plain or not p.is_contiguous():
        return None
    if group["grad_dropout"] or (group["master_weights"] and p.dtype in (torch.float16, torch.bfloat16)):
        return None
    keep = unpack_bits(bits, p.numel())
    n = int(keep.sum())
    if n >= threshold * p.numel():
        return None
    dtype = torch.int32 if p.numel() < 2**31 else torch.int64
    return keep.nonzero().flatten().to(dtype)


def relayout(st: dict, keys, p: torch.Tensor, want: torch.Tensor | None, initial) -> None:
    """Bring the state slots ``keys`` of ``st`` to the layout ``want`` (compact indices or None =
    dense). ``initial(key, template)`` makes a fresh slot like ``template`` (values of elements that
    were not kept before)."""
    have = st.get(INDEX_KEY)
    if have is not None and have.device != p.device:
        have = st[INDEX_KEY] = have.to(p.device)
    if have is None and want is None:
        return
    if have is not None and want is not None and have.shape == want.shape and torch.equal(have, want):
        return
    for key in keys:
        if key not in st:
            continue
        old = st[key]
        dense = initial(key, p, old.dtype) if have is not None else old
        if have is not None:
            dense.view(-1).index_put_((have,), old)
        st[key] = dense if want is None else dense.view(-1).index_select(0, want)
    if want is None:
        st.pop(INDEX_KEY, None)
    else:
        st[INDEX_KEY] = want
