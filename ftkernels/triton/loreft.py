"""Triton kernels of the fused LoReFT intervention (GPU; on CPU tensors through ``TRITON_INTERPRET=1``).

``h' = D(h + s R)`` with ``s = h (W - R)^T + b``; h ``[M, d]``, R and W ``[r, d]``.

- ``_reft_fwd_kernel``: one program per row block sweeps d twice: ``s`` (a tensor-core dot, r
  padded to 16), then ``h' = D(h + s R)``; the second sweep re-reads the rows from L2.
- backward's ``t = D(g) R^T`` runs in ``lora_down`` (shared with the LoRA Linear: the dropout tile
  of g lives in registers only).
- ``_reft_bwd_kernel``: by column blocks with split-M partials (summed by torch: deterministic):
  ``grad_h = D(g) + t (W - R)``, and the partials of ``t^T h`` and ``s^T D(g)`` (grad_W and grad_R),
  reading g and h once.
- ``_reft_fwd_fma_kernel`` / ``_reft_bwd_fma_kernel``: the same two kernels for r <= 4, with the
  rank-r products as exact fp32 FMAs on r separate vectors instead of tensor-core dots (r padded
  to 16). Their loads feed no dot, so Triton does not pipeline them (``num_stages`` does nothing
  there); ``FMA_PREFETCH`` is the hand-written alternative, off until timed.

Passes over ``[M, d]`` through HBM: forward reads h once (twice if its rows have left L2) and
writes h' (2); backward reads g twice and h once and writes grad_h (4). The minimum is 2 and 3
(bench/NOTES.md "LoReFT").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_linear import (
    INTERPRET,
    _br,
    _keep_tile,
    _load2d,
    _prec,
    dropout_threshold,
    lora_down,
    split_m,
)


@triton.jit
def _reft_fwd_kernel(
    h_ptr, wmr_ptr, rot_ptr, b_ptr, out_ptr, s_ptr, seed_ptr, M, D, R,
    shm, shd, swr, swd, srr, srd, som, sod, ssm, ssr,
    thr, inv_keep,
    DROPOUT: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """One row block: s = h (W - R)^T + b over all of d (first sweep), then h' = D(h + s R) (second
    sweep). The second read of the block's rows comes from L2 when it is still there, so h
    crosses HBM once instead of twice (as it did with a ``lora_down`` pass and a separate apply kernel)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        ht = _load2d(h_ptr, rm, ks, shm, shd, M, D)
        wt = _load2d(wmr_ptr, ks, rr, swd, swr, D, R)  # (W - R)^T tile [BK, BR] in h's dtype
        acc = tl.dot(ht, wt, acc, input_precision=PREC)
    s = acc + tl.load(b_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)[None, :]  # zero past r
    tl.store(s_ptr + rm[:, None] * ssm + rr[None, :] * ssr, s, mask=(rm[:, None] < M) & (rr[None, :] < R))
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        rt = _load2d(rot_ptr, rr, ks, srr, srd, R, D)  # fp32 R tile [BR, BK], zero rows past r
        # s R at float32 accuracy (3xTF32): the rank-r update of h, as exact as the FMAs it replaces
        o = _load2d(h_ptr, rm, ks, shm, shd, M, D).to(tl.float32) + tl.dot(s, rt, input_precision="tf32x3")
        if DROPOUT:
            o = tl.where(_keep_tile(seed_ptr, rm, k0, thr, BM, BK), o * inv_keep, tl.zeros_like(o))
        tl.store(out_ptr + rm[:, None] * som + ks[None, :] * sod, o.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (ks[None, :] < D))  # fmt: skip


@triton.jit
def _reft_bwd_kernel(
    g_ptr, h_ptr, t_ptr, s_ptr, wmr_ptr, gh_ptr, pw_ptr, ps_ptr, seed_ptr, M, D, R,
    sgm, sgd, shm, shd, stm, str_, ssm, ssr, swr, swd, sghm, sghd,
    thr, inv_keep,
    DROPOUT: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    pk, ps = tl.program_id(0), tl.program_id(1)
    ks = pk * BK + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    wmr = _load2d(wmr_ptr, rr, ks, swr, swd, R, D).to(tl.float32)  # [BR, BK], zero rows past r
    # grad_W^T and grad_S^T by blocks [BK, BR]: the column block is the MMA's M side (Hopper's wgmma
    # wants 64+ rows there; r padded to 16 sat there before, as in lora_linear's grad_A kernel).
    acc_w = tl.zeros((BK, BR), dtype=tl.float32)
    acc_s = tl.zeros((BK, BR), dtype=tl.float32)
    for m0 in range(ps * BM, M, SPLIT * BM):
        rm = m0 + tl.arange(0, BM)
        gd = _load2d(g_ptr, rm, ks, sgm, sgd, M, D).to(tl.float32)
        if DROPOUT:  # D(g): the forward's mask, regenerated
            gd = tl.where(_keep_tile(seed_ptr, rm, pk * BK, thr, BM, BK), gd * inv_keep, tl.zeros_like(gd))
        hb = _load2d(h_ptr, rm, ks, shm, shd, M, D).to(tl.float32)
        tt = _load2d(t_ptr, rm, rr, stm, str_, M, R).to(tl.float32)  # [BM, BR]
        st = _load2d(s_ptr, rm, rr, ssm, ssr, M, R).to(tl.float32)
        gh = gd + tl.dot(tt, wmr, input_precision=PREC)
        tl.store(gh_ptr + rm[:, None] * sghm + ks[None, :] * sghd, gh.to(gh_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (ks[None, :] < D))  # fmt: skip
        acc_w = tl.dot(tl.trans(hb), tt, acc_w, input_precision=PREC)
        acc_s = tl.dot(tl.trans(gd), st, acc_s, input_precision=PREC)
    out = ps * R * D + rr[None, :] * D + ks[:, None]  # transposed store: partials stay [split, r, d]
    keep = (rr[None, :] < R) & (ks[:, None] < D)
    tl.store(pw_ptr + out, acc_w, mask=keep)
    tl.store(ps_ptr + out, acc_s, mask=keep)


# Ranks up to _SLOTS take the FMA kernels below: r columns of s, t and W - R as separate fp32
# vectors, so every product is an exact fp32 FMA on CUDA cores (12 per element of h at r = 4,
# ~12 us over 8192 x 4096 on an H100, under the memory time) and nothing needs a transposed or
# padded tensor-core operand. The MMA kernels above pad r to 16 and transpose fp32 tiles.
_SLOTS = 4


@triton.jit
def _row(ptr, j, s_r, s_c, cols, R, D):
    """Row j of an fp32 [R, D] matrix at ``cols``, as a [1, len(cols)] tile (zero for j >= R)."""
    live = (cols[None, :] < D) & (cols[None, :] * 0 + j < R)  # a tensor mask (the interpreter wants one)
    return tl.load(ptr + j * s_r + cols[None, :] * s_c, mask=live, other=0.0)


@triton.jit
def _col(ptr, rows, j, s_m, s_r, M, R):
    """Column j of an fp32 [M, R] matrix at ``rows``, as a [len(rows), 1] tile (zero for j >= R)."""
    live = (rows[:, None] < M) & (rows[:, None] * 0 + j < R)
    return tl.load(ptr + rows[:, None] * s_m + j * s_r, mask=live, other=0.0)


@triton.jit
def _reft_fwd_fma_kernel(
    h_ptr, wmr_ptr, rot_ptr, b_ptr, out_ptr, s_ptr, seed_ptr, M, D, R,
    shm, shd, swr, swd, srr, srd, som, sod, ssm, ssr,
    thr, inv_keep,
    DROPOUT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    """The forward for r <= 4 (``_SLOTS``): per row block, s_j = h . (W - R)_j + b_j as elementwise
    fp32 partials [BM, BK] reduced once after the first sweep, then h' = D(h + sum_j s_j R_j).
    PREFETCH loads the next tile of the first sweep before using the current one (Triton does not
    software-pipeline loads that feed no dot: two tiles in flight instead of one)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    a0 = tl.zeros((BM, BK), dtype=tl.float32)
    a1 = tl.zeros((BM, BK), dtype=tl.float32)
    a2 = tl.zeros((BM, BK), dtype=tl.float32)
    a3 = tl.zeros((BM, BK), dtype=tl.float32)
    if PREFETCH:
        nxt = _load2d(h_ptr, rm, tl.arange(0, BK), shm, shd, M, D)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        if PREFETCH:
            ht = nxt.to(tl.float32)
            nxt = _load2d(h_ptr, rm, ks + BK, shm, shd, M, D)  # past d: masked, no traffic
        else:
            ht = _load2d(h_ptr, rm, ks, shm, shd, M, D).to(tl.float32)
        a0 += ht * _row(wmr_ptr, 0, swr, swd, ks, R, D)
        a1 += ht * _row(wmr_ptr, 1, swr, swd, ks, R, D)
        a2 += ht * _row(wmr_ptr, 2, swr, swd, ks, R, D)
        a3 += ht * _row(wmr_ptr, 3, swr, swd, ks, R, D)
    # s_j as [BM, 1] columns (b_j added), stored for the backward
    s0 = tl.sum(a0, axis=1)[:, None] + tl.load(b_ptr)  # b is padded to 4 by the caller
    s1 = tl.sum(a1, axis=1)[:, None] + tl.load(b_ptr + 1)
    s2 = tl.sum(a2, axis=1)[:, None] + tl.load(b_ptr + 2)
    s3 = tl.sum(a3, axis=1)[:, None] + tl.load(b_ptr + 3)
    live = rm[:, None] < M
    tl.store(s_ptr + rm[:, None] * ssm, s0, mask=live)
    tl.store(s_ptr + rm[:, None] * ssm + ssr, s1, mask=live & (rm[:, None] * 0 + 1 < R))
    tl.store(s_ptr + rm[:, None] * ssm + 2 * ssr, s2, mask=live & (rm[:, None] * 0 + 2 < R))
    tl.store(s_ptr + rm[:, None] * ssm + 3 * ssr, s3, mask=live & (rm[:, None] * 0 + 3 < R))
    for k0 in range(0, D, BK):  # the block's rows again, from L2 while they are still there
        ks = k0 + tl.arange(0, BK)
        o = _load2d(h_ptr, rm, ks, shm, shd, M, D).to(tl.float32)
        o += s0 * _row(rot_ptr, 0, srr, srd, ks, R, D)
        o += s1 * _row(rot_ptr, 1, srr, srd, ks, R, D)
        o += s2 * _row(rot_ptr, 2, srr, srd, ks, R, D)
        o += s3 * _row(rot_ptr, 3, srr, srd, ks, R, D)
        if DROPOUT:
            o = tl.where(_keep_tile(seed_ptr, rm, k0, thr, BM, BK), o * inv_keep, tl.zeros_like(o))
        tl.store(out_ptr + rm[:, None] * som + ks[None, :] * sod, o.to(out_ptr.dtype.element_ty),
                 mask=live & (ks[None, :] < D))  # fmt: skip


@triton.jit
def _reft_bwd_fma_kernel(
    g_ptr, h_ptr, t_ptr, s_ptr, wmr_ptr, gh_ptr, pw_ptr, ps_ptr, seed_ptr, M, D, R,
    sgm, sgd, shm, shd, stm, str_, ssm, ssr, swr, swd, sghm, sghd,
    thr, inv_keep,
    DROPOUT: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    """The backward for r <= 4 by column blocks with split-M partials: grad_h = D(g) + sum_j t_j (W-R)_j;
    the partials of t_j^T h and s_j^T D(g) accumulate elementwise in [BM, BK] and are reduced over
    rows once at the end (no per-iteration cross-thread reduction). PREFETCH: as in the forward, the
    next row block's g and h tiles are loaded before the current ones are used."""
    pk, ps = tl.program_id(0), tl.program_id(1)
    ks = pk * BK + tl.arange(0, BK)
    w0 = _row(wmr_ptr, 0, swr, swd, ks, R, D)
    w1 = _row(wmr_ptr, 1, swr, swd, ks, R, D)
    w2 = _row(wmr_ptr, 2, swr, swd, ks, R, D)
    w3 = _row(wmr_ptr, 3, swr, swd, ks, R, D)
    aw0 = tl.zeros((BM, BK), dtype=tl.float32)
    aw1 = tl.zeros((BM, BK), dtype=tl.float32)
    aw2 = tl.zeros((BM, BK), dtype=tl.float32)
    aw3 = tl.zeros((BM, BK), dtype=tl.float32)
    as0 = tl.zeros((BM, BK), dtype=tl.float32)
    as1 = tl.zeros((BM, BK), dtype=tl.float32)
    as2 = tl.zeros((BM, BK), dtype=tl.float32)
    as3 = tl.zeros((BM, BK), dtype=tl.float32)
    if PREFETCH:
        r0 = ps * BM + tl.arange(0, BM)
        g_nxt = _load2d(g_ptr, r0, ks, sgm, sgd, M, D)
        h_nxt = _load2d(h_ptr, r0, ks, shm, shd, M, D)
    for m0 in range(ps * BM, M, SPLIT * BM):
        rm = m0 + tl.arange(0, BM)
        if PREFETCH:
            gd, hb = g_nxt.to(tl.float32), h_nxt.to(tl.float32)
            rn = rm + SPLIT * BM  # past M: masked, no traffic
            g_nxt = _load2d(g_ptr, rn, ks, sgm, sgd, M, D)
            h_nxt = _load2d(h_ptr, rn, ks, shm, shd, M, D)
        else:
            gd = _load2d(g_ptr, rm, ks, sgm, sgd, M, D).to(tl.float32)
            hb = _load2d(h_ptr, rm, ks, shm, shd, M, D).to(tl.float32)
        if DROPOUT:  # the forward's mask, regenerated; 1/(1-p) is applied to the sums below
            gd = tl.where(_keep_tile(seed_ptr, rm, pk * BK, thr, BM, BK), gd, tl.zeros_like(gd))
        t0 = _col(t_ptr, rm, 0, stm, str_, M, R)
        t1 = _col(t_ptr, rm, 1, stm, str_, M, R)
        t2 = _col(t_ptr, rm, 2, stm, str_, M, R)
        t3 = _col(t_ptr, rm, 3, stm, str_, M, R)
        gh = gd * inv_keep + t0 * w0 + t1 * w1 + t2 * w2 + t3 * w3
        tl.store(gh_ptr + rm[:, None] * sghm + ks[None, :] * sghd, gh.to(gh_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (ks[None, :] < D))  # fmt: skip
        aw0 += t0 * hb
        aw1 += t1 * hb
        aw2 += t2 * hb
        aw3 += t3 * hb
        as0 += _col(s_ptr, rm, 0, ssm, ssr, M, R) * gd
        as1 += _col(s_ptr, rm, 1, ssm, ssr, M, R) * gd
        as2 += _col(s_ptr, rm, 2, ssm, ssr, M, R) * gd
        as3 += _col(s_ptr, rm, 3, ssm, ssr, M, R) * gd
    out = ps * R * D + ks  # partials [split, r, d]
    keep = ks < D
    tl.store(pw_ptr + out, tl.sum(aw0, axis=0), mask=keep)
    tl.store(pw_ptr + out + D, tl.sum(aw1, axis=0), mask=keep & (ks * 0 + 1 < R))
    tl.store(pw_ptr + out + 2 * D, tl.sum(aw2, axis=0), mask=keep & (ks * 0 + 2 < R))
    tl.store(pw_ptr + out + 3 * D, tl.sum(aw3, axis=0), mask=keep & (ks * 0 + 3 < R))
    tl.store(ps_ptr + out, tl.sum(as0, axis=0) * inv_keep, mask=keep)
    tl.store(ps_ptr + out + D, tl.sum(as1, axis=0) * inv_keep, mask=keep & (ks * 0 + 1 < R))
    tl.store(ps_ptr + out + 2 * D, tl.sum(as2, axis=0) * inv_keep, mask=keep & (ks * 0 + 2 < R))
    tl.store(ps_ptr + out + 3 * D, tl.sum(as3, axis=0) * inv_keep, mask=keep & (ks * 0 + 3 < R))


# (BM, BK) of the backward kernel. On (64, 128) tiles it needed 255 registers and spilled 64-1264
# bytes (ptxas, triton 3.6, sm_90a); the [BK, r] orientation there wanted 232 KB of shared memory in
# fp32 with dropout, over the H100's 227. (32, 64) with 2 stages: 122-214 registers, no spills.
_BWD_BLOCKS = (32, 32) if INTERPRET else (32, 64)


def _fwd_blocks(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BM, BK, warps, stages) of the forward kernel: 16-row blocks (a row block's second sweep should
    find its rows in L2), spill-free in ptxas (sm_90a, triton 3.6 and 3.9): 62-75 registers in
    16-bit (16x128, 8 warps; 16x256 spilled with dropout in 3.9), 168 in fp32 (16x64; 16x128
    spilled 8-32 bytes)."""
    if INTERPRET:
        return 16, 32, 4, 1
    return (16, 64, 4, 4) if dtype == torch.float32 else (16, 128, 8, 4)


# (BM, BK, warps, stages) of the FMA kernels (r <= 4); module-level so scripts can try others.
# FMA_PREFETCH: two tiles in flight per program (written 2026-11-23 with no GPU lent; off until
# scripts/diag_kernels.py has timed it, see bench/NOTES.md "Session 7").
FMA_PREFETCH = False
FMA_FWD_BLOCKS = (16, 32, 4, 1) if INTERPRET else (32, 128, 8, 3)
FMA_BWD_BLOCKS = (16, 32, 4, 1) if INTERPRET else (16, 64, 4, 3)


def with_prefetch(fn, *args):
    """``fn(*args)`` with ``FMA_PREFETCH`` on, restored after (scripts time the option side by side)."""
    global FMA_PREFETCH
    old, FMA_PREFETCH = FMA_PREFETCH, True
    try:
        return fn(*args)
    finally:
        FMA_PREFETCH = old


def forward(h, rot, w, b, dropout, seed):
    """GPU forward of ``ftkernels::loreft_fwd``: h ``[M, d]``; R, W ``[r, d]`` and b ``[r]`` in fp32 (or
    h's dtype). Returns (h' in h's dtype, s ``[M, r]`` fp32)."""
    M, D = h.shape
    R = rot.shape[0]
    rf, bf = rot.float(), b.float()
    out = torch.empty_like(h)
    s = torch.empty((M, R), device=h.device, dtype=torch.float32)
    thr, inv_keep = dropout_threshold(dropout), 1.0 / (1.0 - dropout)
    if R <= _SLOTS:
        wmr = w.float() - rf  # fp32: its products are FMAs
        bf = torch.nn.functional.pad(bf, (0, _SLOTS - R))  # the kernel reads b_0..b_3
        BM, BK, warps, stages = FMA_FWD_BLOCKS
        kernel, extra = _reft_fwd_fma_kernel, dict(PREFETCH=FMA_PREFETCH)
    else:
        wmr = (w.float() - rf).to(h.dtype)  # an operand of the tensor-core dot: h's dtype
        BM, BK, warps, stages = _fwd_blocks(h.dtype)
        kernel, extra = _reft_fwd_kernel, dict(PREC=_prec(h.dtype), BR=_br(R))
    kernel[(triton.cdiv(M, BM),)](
        h, wmr, rf, bf, out, s, seed, M, D, R,
        h.stride(0), h.stride(1), wmr.stride(0), wmr.stride(1), rf.stride(0), rf.stride(1),
        out.stride(0), out.stride(1), s.stride(0), s.stride(1), thr, inv_keep,
        DROPOUT=dropout > 0, BM=BM, BK=BK, num_warps=warps, num_stages=stages, **extra,
    )  # fmt: skip
    return out, s


def backward(grad, h, rot, w, s, dropout, seed):
    """GPU backward of ``ftkernels::loreft_bwd``: (grad_h, grad_R, grad_W, grad_b), the last three fp32."""
    M, D = h.shape
    R = rot.shape[0]
    t = lora_down(grad, rot.to(h.dtype), seed, dropout, out_dtype=torch.float32)  # D(g) R^T
    wmr = w.float() - rot.float()
    grad_h = torch.empty_like(h)
    if R <= _SLOTS:
        BM, BK, warps, stages = FMA_BWD_BLOCKS
        kernel, extra = _reft_bwd_fma_kernel, dict(PREFETCH=FMA_PREFETCH)
    else:
        (BM, BK), warps, stages = _BWD_BLOCKS, 4, 2
        kernel, extra = _reft_bwd_kernel, dict(PREC=_prec(h.dtype), BR=_br(R))
    split = split_m(M, D, BM, BK, h.device)
    pw = torch.empty((split, R, D), device=h.device, dtype=torch.float32)
    ps = torch.empty_like(pw)
    kernel[(triton.cdiv(D, BK), split)](
        grad, h, t, s, wmr, grad_h, pw, ps, seed, M, D, R,
        grad.stride(0), grad.stride(1), h.stride(0), h.stride(1), t.stride(0), t.stride(1), s.stride(0), s.stride(1),
        wmr.stride(0), wmr.stride(1), grad_h.stride(0), grad_h.stride(1),
        dropout_threshold(dropout), 1.0 / (1.0 - dropout),
        DROPOUT=dropout > 0, SPLIT=split, BM=BM, BK=BK, num_warps=warps, num_stages=stages, **extra,
    )  # fmt: skip
    grad_w = pw.sum(0)
    grad_r = ps.sum(0).sub_(grad_w)
    return grad_h, grad_r, grad_w, t.sum(0)
