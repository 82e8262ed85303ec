"""Triton kernel of ``ftkernels::lora_dropout``: D(x) from the LoRA Philox stream (the same mask as
``csrc/cpu/lora_dropout.cpp``) over x's logical ``[numel / K, K]`` view, for any strides (NCHW and
channels-last give the same mask)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_linear import INTERPRET, _keep_tile, dropout_threshold


@triton.jit
def _lora_dropout_kernel(
    x_ptr, out_ptr, seed_ptr, ROWS, D1, D2, K,
    sx0, sx1, sx2, sx3, so0, so1, so2, so3,
    thr, inv_keep,
    BM: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    ks = tl.program_id(1) * BK + tl.arange(0, BK)
    r = rm.to(tl.int64)  # logical row -> (i0, i1, i2), last fastest
    i2 = r % D2
    i1 = (r // D2) % D1
    i0 = r // (D2 * D1)
    xo = i0 * sx0 + i1 * sx1 + i2 * sx2
    oo = i0 * so0 + i1 * so1 + i2 * so2
    tile = (rm[:, None] < ROWS) & (ks[None, :] < K)
    xt = tl.load(x_ptr + xo[:, None] + ks[None, :] * sx3, mask=tile, other=0.0).to(tl.float32)
    keep = _keep_tile(seed_ptr, rm, tl.program_id(1) * BK, thr, BM, BK)
    val = tl.where(keep, xt * inv_keep, tl.zeros_like(xt))
    tl.store(out_ptr + oo[:, None] + ks[None, :] * so3, val.to(out_ptr.dtype.element_ty), mask=tile)


def _foldable(x: torch.Tensor, o: torch.Tensor) -> int | None:
    """A leading dim i (i + 1 < the last dim) whose pair (i, i + 1) flattens to a view in both x and o:
    NCDHW folds N and C, channels-last-3d folds D and H."""
    for i in range(x.dim() - 2):
        if all(t.stride(i) == t.size(i + 1) * t.stride(i + 1) or t.size(i) == 1 for t in (x, o)):
            return i
    return None


def lora_dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """``D(x)``: kept elements scaled by ``1/(1-p)``; same shape and memory format as x."""
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    x4, o4 = x, out
    while x4.dim() < 4:
        x4, o4 = x4.unsqueeze(0), o4.unsqueeze(0)
    while x4.dim() > 4:  # fold two adjacent leading dims that share one stride in both (row order kept)
        i = _foldable(x4, o4)
        if i is None:  # no view folds (a strided 5-d slice): the kernel on a dense copy
            out.copy_(lora_dropout(x.contiguous(), p, seed))
            return out
        x4, o4 = x4.flatten(i, i + 1), o4.flatten(i, i + 1)
    D0, D1, D2, K = x4.shape
    rows = D0 * D1 * D2
    BM, BK = (16, 32) if INTERPRET else (32, 128)
    _lora_dropout_kernel[(triton.cdiv(rows, BM), triton.cdiv(K, BK))](
        x4, o4, seed, rows, D1, D2, K, *x4.stride(), *o4.stride(),
        dropout_threshold(p), 1.0 / (1.0 - p), BM=BM, BK=BK, num_warps=4,
    )  # fmt: skip
    return out
