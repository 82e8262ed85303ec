"""Triton kernels of ``MaskedLinear``'s rows-mode weight gradient (GPU; on CPU tensors through
``TRITON_INTERPRET=1``).

``grad_W[rows[i], :] = g[:, rows[i]]^T x`` for the kept output rows, zero elsewhere. Three kernels:

- ``gather_t``: ``gt = g[:, rows]^T`` (``[NR, M]``, row-major) in one pass over g. With 10% of the
  columns kept at random, nearly every 32-byte sector of g is still touched, so this costs about one
  read of g; ATen's ``index_select(1, ...)`` took 1.5x that on an H100 (37.6 us at M8192 N4096).
  ``gt``'s rows run along the reduction, the layout both GEMMs below read best.
- ``fill_rows``: the full-size gradient in one write: row n is ``res[inv[n]]`` where ``inv[n] >= 0``,
  zero elsewhere (replaces a zero fill plus ``index_copy``: 26.8 us there for ~11 us of bytes).
- ``rows_gemm``: ``gt @ x`` whose epilogue stores each result row at its index in the full-size
  gradient, in a grid extended by programs that zero the other rows. The GEMM's tiles leave SMs
  idle in its one wave (7 x 16 tiles of 64 x 256 on 132 SMs); the zeroing programs run there,
  under the GEMM, instead of as a pass of their own.

Routes (``nn/masked.py``): ``split`` = gather_t, cuBLAS ``gt @ x``, fill_rows; ``fused`` = gather_t,
rows_gemm. Both feed the bias gradient from ``gt`` (a 10x smaller read than g).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_linear import INTERPRET, _prec, _sm_count, prune_by_width, tile_configs


@triton.jit
def _gather_t_kernel(g_ptr, idx_ptr, out_ptr, M, NI, sgm, sgn, BM: tl.constexpr, BN: tl.constexpr):
    # out[j, m] = g[m, idx[j]]; tiles of BM tokens x BN kept columns.
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rj = pid_n * BN + tl.arange(0, BN)
    col = tl.load(idx_ptr + rj, mask=rj < NI, other=0)
    ok = (rm[:, None] < M) & (rj[None, :] < NI)
    t = tl.load(g_ptr + rm.to(tl.int64)[:, None] * sgm + col[None, :] * sgn, mask=ok)
    tl.store(out_ptr + rj.to(tl.int64)[None, :] * M + rm[:, None], t, mask=ok)


@triton.jit
def _fill_rows_kernel(res_ptr, inv_ptr, out_ptr, N, K, srn, srk, BN: tl.constexpr, BK: tl.constexpr):
    # out[n, k] = res[inv[n], k] if inv[n] >= 0 else 0 (out row-major [N, K]).
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = pid_k * BK + tl.arange(0, BK)
    pos = tl.load(inv_ptr + rn, mask=rn < N, other=-1).to(tl.int64)
    inside = (rn[:, None] < N) & (rk[None, :] < K)
    v = tl.load(res_ptr + pos[:, None] * srn + rk[None, :] * srk, mask=inside & (pos[:, None] >= 0), other=0.0)
    tl.store(out_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :], v.to(out_ptr.dtype.element_ty), mask=inside)


# (BM kept rows, BN columns of x, BK reduction rows, warps, stages) per element width. 64-row tiles
# keep 7 row tiles for 410 kept rows (448 computed, not 512) and one warpgroup per MMA; the 128 x 256
# tile mirrors cuBLAS's (64 programs, the zeroing gets the other 68 SMs).
_TILES = {
    2: [(64, 256, 64, 4, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)],
    4: [(64, 128, 32, 4, 3), (64, 64, 32, 4, 3)],
}


def _gemm_configs():
    if INTERPRET:
        return [triton.Config({"BM": 16, "BN": 32, "BK": 16}, num_warps=4, num_stages=1)]
    return tile_configs(_TILES)


def zero_programs(n_gemm: int, n_zero_rows: int, sms: int) -> int:
    """Programs given to zeroing ``n_zero_rows`` rows next to ``n_gemm`` GEMM programs: the SMs the
    GEMM's last wave leaves idle, or a full wave when that would be a sliver (under sms / 8)."""
    if n_zero_rows == 0:
        return 0
    idle = -n_gemm % sms
    return idle if idle >= max(1, sms // 8) else sms


@triton.autotune(configs=_gemm_configs(), key=["NR", "M", "K", "NZ"],
                 prune_configs_by={"early_config_prune": prune_by_width(_TILES, "x_ptr")})  # fmt: skip
@triton.jit
def _rows_gemm_kernel(
    gt_ptr, x_ptr, rows_ptr, zrows_ptr, out_ptr, NR, M, K, NZ,
    sgr, sgm, sxm, sxk, son, sok,
    PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(K, BN)
    n_gemm = tl.cdiv(NR, BM) * tiles_n
    if pid < n_gemm:
        rr = (pid // tiles_n) * BM + tl.arange(0, BM)
        rk = (pid % tiles_n) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for m0 in range(0, M, BK):
            rm = m0 + tl.arange(0, BK)
            a = tl.load(gt_ptr + rr.to(tl.int64)[:, None] * sgr + rm[None, :] * sgm,
                        mask=(rr[:, None] < NR) & (rm[None, :] < M), other=0.0)  # fmt: skip
            b = tl.load(x_ptr + rm.to(tl.int64)[:, None] * sxm + rk[None, :] * sxk,
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)  # fmt: skip
            acc = tl.dot(a, b, acc, input_precision=PREC)
        dest = tl.load(rows_ptr + rr, mask=rr < NR, other=0).to(tl.int64)
        tl.store(out_ptr + dest[:, None] * son + rk[None, :] * sok, acc.to(out_ptr.dtype.element_ty),
                 mask=(rr[:, None] < NR) & (rk[None, :] < K))  # fmt: skip
    else:
        # A zeroing program: rows zrows[lo:hi] of the output, BM x BN at a time.
        z, nprog = pid - n_gemm, tl.num_programs(0) - n_gemm
        per = tl.cdiv(NZ, nprog)
        lo = z * per
        hi = tl.minimum(lo + per, NZ)
        zero = tl.zeros((BM, BN), dtype=out_ptr.dtype.element_ty)
        for r0 in range(lo, hi, BM):
            rz = r0 + tl.arange(0, BM)
            dest = tl.load(zrows_ptr + rz, mask=rz < hi, other=0).to(tl.int64)
            for k0 in range(0, K, BN):
                rk = k0 + tl.arange(0, BN)
                tl.store(out_ptr + dest[:, None] * son + rk[None, :] * sok, zero,
                         mask=(rz[:, None] < hi) & (rk[None, :] < K))  # fmt: skip


def _check(g: torch.Tensor, idx: torch.Tensor) -> None:
    if idx.dtype not in (torch.int32, torch.int64) or idx.device != g.device:
        raise TypeError(f"row indices must be int32/int64 on {g.device}, got {idx.dtype} on {idx.device}")


def gather_t(g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``g[:, idx]^T``: ``[len(idx), M]`` row-major, for g ``[M, N]`` (any strides)."""
    _check(g, idx)
    M = g.shape[0]
    ni = idx.numel()
    out = g.new_empty((ni, M))
    if ni == 0 or M == 0:
        return out
    BM, BN = (32, 16) if INTERPRET else (64, 64)
    grid = (triton.cdiv(M, BM), triton.cdiv(ni, BN))
    _gather_t_kernel[grid](g, idx, out, M, ni, g.stride(0), g.stride(1), BM=BM, BN=BN, num_warps=4)
    return out


def fill_rows(res: torch.Tensor, inv: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """The ``shape`` = ``[N, K]`` tensor whose row n is ``res[inv[n]]`` where ``inv[n] >= 0``, else zero."""
    _check(res, inv)
    N, K = shape
    out = torch.empty((N, K), dtype=dtype, device=res.device)
    if out.numel() == 0:
        return out
    BN, BK = (8, 32) if INTERPRET else (8, 512)
    grid = (triton.cdiv(N, BN), triton.cdiv(K, BK))
    _fill_rows_kernel[grid](res, inv, out, N, K, res.stride(0), res.stride(1), BN=BN, BK=BK, num_warps=4)
    return out


def rows_gemm(gt: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, zrows: torch.Tensor, shape) -> torch.Tensor:
    """``out[rows[i]] = (gt @ x)[i]`` and ``out[zrows] = 0``, out ``shape`` = ``[N, K]`` in x's dtype:
    gt ``[NR, M]``, x ``[M, K]``; ``rows`` and ``zrows`` partition ``range(N)``."""
    _check(x, rows)
    _check(x, zrows)
    NR, M = gt.shape
    K = x.shape[1]
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    nz = zrows.numel()
    if out.numel() == 0:
        return out
    sms = 4 if INTERPRET else _sm_count(x.device)

    def grid(meta):
        n_gemm = triton.cdiv(NR, meta["BM"]) * triton.cdiv(K, meta["BN"])
        return (n_gemm + zero_programs(n_gemm, nz, sms),)

    _rows_gemm_kernel[grid](
        gt, x, rows, zrows, out, NR, M, K, nz,
        gt.stride(0), gt.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1), PREC=_prec(x.dtype),
    )  # fmt: skip
    return out
