"""Triton kernel of ``MaskedLinear``'s rows-mode weight gradient (GPU; on CPU tensors through
``TRITON_INTERPRET=1``).

``grad_W[rows[i], :] = g[:, rows[i]]^T x`` for the kept output rows, written straight into the
full-size (zero-filled) gradient: g's kept columns are read in place (no gathered copy of g) and
the result rows are stored at their indices (no ``index_copy``). The ATen route (gather, GEMM,
index_copy) stays; ``masked_weight_grad_linear`` times both once per shape and keeps the faster
(``FTKERNELS_MASKED_WGRAD`` = ``auto`` | ``triton`` | ``torch``).

Bytes: with 10% of the rows kept at random, the kept columns of g still touch about every
32-byte sector of g, so the floor is one read of g and x plus the gradient's write: at M8192,
K=N=4096 bf16 ~160 MB, ~53 us at 3 TB/s, against 37.5 us for 10% of the dense GEMM's flops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_linear import INTERPRET, _prec, prune_by_width, tile_configs

# (BM reduction rows, BN kept rows, BK columns of x = the MMA's M side, warps, stages) per element
# width: spill-free in ptxas (triton 3.6, sm_90a; scripts/kernel_resources.py). Every fp32 tile of
# 64+ reduction rows spilled (the gathered g tile holds a 64-bit address per element).
_TILES = {
    2: [(64, 64, 128, 8, 3), (32, 64, 256, 8, 3), (32, 128, 128, 8, 3), (32, 64, 128, 8, 3), (32, 64, 64, 4, 3)],
    4: [(32, 64, 128, 8, 3), (32, 64, 64, 4, 3), (16, 64, 128, 4, 3)],
}


def _configs():
    if INTERPRET:
        return [triton.Config({"BM": 32, "BN": 16, "BK": 32}, num_warps=4, num_stages=1)]
    return tile_configs(_TILES)


@triton.autotune(configs=_configs(), key=["M", "NR", "K"],
                 prune_configs_by={"early_config_prune": prune_by_width(_TILES, "g_ptr")})  # fmt: skip
@triton.jit
def _rows_wgrad_kernel(
    g_ptr, x_ptr, rows_ptr, out_ptr, M, NR, K,
    sgm, sgn, sxm, sxk, son, sok,
    PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    ri = pid_n * BN + tl.arange(0, BN)
    idx = tl.load(rows_ptr + ri, mask=ri < NR, other=0)  # kept output rows (= columns of g)
    ks = pid_k * BK + tl.arange(0, BK)
    # grad_W^T blocks [BK, BN]: the x column block is the MMA's M side (the [BN, BK] orientation put
    # the kept rows there, as in lora_linear's slow grad_A). Each program re-gathers g's kept
    # columns, K / BK times in all: a large BK keeps that small.
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    for m0 in range(0, M, BM):
        rm = m0 + tl.arange(0, BM)
        gt = tl.load(g_ptr + rm[:, None] * sgm + idx[None, :] * sgn, mask=(rm[:, None] < M) & (ri[None, :] < NR),
                     other=0.0)  # fmt: skip
        xt = tl.load(x_ptr + rm[:, None] * sxm + ks[None, :] * sxk, mask=(rm[:, None] < M) & (ks[None, :] < K),
                     other=0.0)  # fmt: skip
        acc = tl.dot(tl.trans(xt), gt, acc, input_precision=PREC)
    tl.store(out_ptr + idx[None, :] * son + ks[:, None] * sok, acc.to(out_ptr.dtype.element_ty),
             mask=(ri[None, :] < NR) & (ks[:, None] < K))  # fmt: skip


def rows_weight_grad(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, shape) -> torch.Tensor:
    """grad_W ``[N, K]`` (zero outside ``rows``) of ``y = x W^T``: g ``[M, N]``, x ``[M, K]``, rows int64."""
    M, K = x.shape
    out = g.new_zeros(shape)
    nr = rows.numel()
    if nr == 0 or M == 0:
        return out

    def grid(meta):
        return (triton.cdiv(nr, meta["BN"]), triton.cdiv(K, meta["BK"]))

    _rows_wgrad_kernel[grid](
        g, x, rows, out, M, nr, K, g.stride(0), g.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        PREC=_prec(g.dtype),
    )  # fmt: skip
    return out
