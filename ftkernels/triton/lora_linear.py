"""Triton kernels of the fused LoRA Linear (GPU; on CPU tensors through ``TRITON_INTERPRET=1``).

Three kernels, all regenerating the dropout mask from the Philox stream of ``csrc/include/ftk/lora.h``
(bit-identical to the CPU kernel) instead of storing it:

- ``_lora_down_kernel``: ``u = D(x) A^T`` (``[M, r]``), the dropped copy of x lives in registers only.
- ``_lowrank_gemm_kernel``: ``out = X Wop + bias + scale * mask?(U V)``: a tiled GEMM whose epilogue
  adds the rank-r product (and, for the backward's dgrad, applies the dropout mask to it), so the
  output is written once. Forward: ``y = x W^T + b + s u B^T``. Dgrad: ``grad_x = g W + D'(v A)``.
- ``_lora_grad_a_kernel``: ``grad_A = v^T D(x)`` by column blocks with split-M partials (summed by
  torch, deterministic); optionally fused with ``grad_x += D'(v A)`` when grad_x came from cuBLAS.

Two ways to run the big GEMMs (``FTKERNELS_LORA_GEMM`` = ``cublas``, the default | ``triton`` |
``auto``, which times both once per shape and keeps the faster): ``triton`` fuses the rank-r update
into our GEMM; ``cublas`` runs the base GEMM in cuBLAS and adds the rank-r part in a second pass.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

from .._route import Route

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Globals read by kernels must be constexpr objects (the interpreter would not notice otherwise).
LORA_STREAM = tl.constexpr(0x4C6F5241)  # ftk::kLoraStream
DROPOUT_TAG = tl.constexpr(0x46544B31)  # the fourth counter word of every ftkernels dropout stream


def dropout_threshold(p: float) -> int:
    """Integer keep threshold of ``ftk::dropout_threshold``: keep iff the 16-bit draw >= it (p
    rounded to float32 first, as the C++ does; called per launch, so no tensor is made for it)."""
    return math.ceil(float(np.float32(p)) * 65536.0)


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (ftk::philox4x32_10)."""
    for _ in tl.static_range(10):
        m0 = tl.zeros_like(c0) + 0xD2511F53
        m1 = tl.zeros_like(c0) + 0xCD9E8D57
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _keep_tile(seed_ptr, rows, col0, thr, BM: tl.constexpr, BC: tl.constexpr):
    """Keep flags ``[BM, BC]`` of elements (rows[i], col0 + j); col0 % 8 == 0, BC % 8 == 0.

    One Philox call serves 8 columns: the four words' low and high halves are interleaved back into
    column order with joins (last joined dim varies fastest: word, then half)."""
    seed = tl.load(seed_ptr)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    G: tl.constexpr = BC // 8
    kg = (col0 // 8 + tl.arange(0, G)).to(tl.uint32)
    c0 = tl.broadcast_to(kg[None, :], (BM, G))
    c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], (BM, G))
    c2 = tl.zeros_like(c0) + LORA_STREAM
    c3 = tl.zeros_like(c0) + DROPOUT_TAG
    w0, w1, w2, w3 = _philox(c0, c1, c2, c3, k0, k1)
    # Word w = 2 * wh + wl sits at [..., wh, wl]: lane 2 w + half of the group after the last join.
    lo = tl.join(tl.join(w0 & 0xFFFF, w2 & 0xFFFF), tl.join(w1 & 0xFFFF, w3 & 0xFFFF))  # [BM, G, wh, wl]
    hi = tl.join(tl.join(w0 >> 16, w2 >> 16), tl.join(w1 >> 16, w3 >> 16))
    draws = tl.reshape(tl.join(lo, hi), (BM, BC))  # [BM, G, wh, wl, half] -> column order
    return draws >= thr


@triton.jit
def _load2d(ptr, rows, cols, s_r, s_c, n_r, n_c):
    """The [len(rows), len(cols)] tile at (rows, cols) of a strided matrix, zero outside [n_r, n_c]."""
    return tl.load(ptr + rows[:, None] * s_r + cols[None, :] * s_c, mask=(rows[:, None] < n_r) & (cols[None, :] < n_c),
                   other=0.0)  # fmt: skip


@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, u_ptr, seed_ptr, M, K, R,
    sxm, sxk, sar, sak, sum_, sur,
    thr, inv_keep,
    DROPOUT: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        xt = _load2d(x_ptr, rm, ks, sxm, sxk, M, K)
        if DROPOUT:
            xt = tl.where(_keep_tile(seed_ptr, rm, k0, thr, BM, BK), xt, tl.zeros_like(xt))
        at = _load2d(a_ptr, ks, rr, sak, sar, K, R)  # A^T tile [BK, BR]
        acc = tl.dot(xt, at, acc, input_precision=PREC)
    if DROPOUT:
        acc = acc * inv_keep
    tl.store(u_ptr + rm[:, None] * sum_ + rr[None, :] * sur, acc.to(u_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < R))  # fmt: skip


# (BM, BN, BK, warps, stages) of the fused GEMM, per operand width: the ones ptxas (triton 3.6,
# sm_90a) compiles without spills and within 227 KB of shared memory (scripts/kernel_resources.py).
# The usual 128x256 / 256x128 tiles spilled 570-870 bytes here (the u v epilogue and the dropout
# draws share the registers); fp32 tiles of 128x128x64 also wanted 256-320 KB of shared memory.
_GEMM_TILES = {
    2: [(128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 8, 3),
        (64, 128, 32, 8, 3), (32, 64, 64, 4, 4)],
    4: [(128, 128, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 64, 4, 3), (64, 64, 32, 4, 3), (32, 64, 64, 4, 4)],
}  # fmt: skip


def _config_tile(c) -> tuple:
    k = c.kwargs
    return (k["BM"], k["BN"], k["BK"], c.num_warps, c.num_stages)


def prune_by_width(tiles: dict[int, list[tuple]], arg: str):
    """An autotuner ``early_config_prune`` keeping the configs listed for the element width of
    tensor argument ``arg`` (all of them under the interpreter)."""

    def prune(configs, nargs, **kwargs):
        if INTERPRET:
            return configs
        keep = set(tiles[min(nargs[arg].element_size(), 4)])
        return [c for c in configs if _config_tile(c) in keep]

    return prune


def tile_configs(tiles: dict[int, list[tuple]], **extra) -> list:
    """Autotuner configs for the union of the per-width (BM, BN, BK, warps, stages) lists; ``extra``
    constexprs go into every config (``prune_by_width`` then keeps one width's list per call)."""
    shapes = sorted({t for per_width in tiles.values() for t in per_width})
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, **extra}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in shapes
    ]


def _gemm_configs():
    if INTERPRET:
        return [triton.Config({"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    return tile_configs(_GEMM_TILES, GROUP_M=8)


@triton.autotune(
    configs=_gemm_configs(),
    key=["M", "N", "K", "R", "DROPOUT", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": prune_by_width(_GEMM_TILES, "x_ptr")},
)
@triton.jit
def _lowrank_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, u_ptr, v_ptr, out_ptr, seed_ptr, M, N, K, R,
    sxm, sxk, swk, swn, sum_, sur, svr, svn, som, son,
    scale, thr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr, BR: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped launch order: GROUP_M row blocks share each column block of Wop while it is in L2.
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + rk
        xt = _load2d(x_ptr, rm, ks, sxm, sxk, M, K)
        wt = _load2d(w_ptr, ks, rn, swk, swn, K, N)
        acc = tl.dot(xt, wt, acc, input_precision=PREC)
    # Epilogue: the rank-r product of this tile, masked by the dropout stream for dgrad.
    rr = tl.arange(0, BR)
    ut = _load2d(u_ptr, rm, rr, sum_, sur, M, R)
    vt = _load2d(v_ptr, rr, rn, svr, svn, R, N)
    low = tl.dot(ut, vt, input_precision=PREC)
    if DROPOUT:
        low = tl.where(_keep_tile(seed_ptr, rm, pid_n * BN, thr, BM, BN), low, tl.zeros_like(low))
    acc += low * scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))  # fmt: skip


@triton.jit
def _lora_grad_a_kernel(
    x_ptr, v_ptr, a_ptr, gx_ptr, part_ptr, seed_ptr, M, K, R,
    sxm, sxk, svm, svr, sar, sak, sgm, sgk,
    thr, inv_keep,
    DX: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    pk, ps = tl.program_id(0), tl.program_id(1)
    ks = pk * BK + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    # grad_A^T by blocks [BK, BR]: the K block is the MMA's M side. The [BR, BK] orientation put r
    # (16) there, below Hopper's 64-row wgmma: 126 us where cuBLAS's v^T x took 12 (H100, bf16).
    acc = tl.zeros((BK, BR), dtype=tl.float32)
    if DX:
        at = _load2d(a_ptr, rr, ks, sar, sak, R, K)
    for m0 in range(ps * BM, M, SPLIT * BM):
        rm = m0 + tl.arange(0, BM)
        tile = (rm[:, None] < M) & (ks[None, :] < K)
        keep = _keep_tile(seed_ptr, rm, pk * BK, thr, BM, BK)
        xt = _load2d(x_ptr, rm, ks, sxm, sxk, M, K)
        xt = tl.where(keep, xt, tl.zeros_like(xt))
        vt = _load2d(v_ptr, rm, rr, svm, svr, M, R)
        acc = tl.dot(tl.trans(xt), vt, acc, input_precision=PREC)
        if DX:
            t = tl.dot(vt, at, input_precision=PREC)
            gp = gx_ptr + rm[:, None] * sgm + ks[None, :] * sgk
            gx = tl.load(gp, mask=tile, other=0.0).to(tl.float32)
            gx += tl.where(keep, t * inv_keep, tl.zeros_like(t))
            tl.store(gp, gx.to(gx_ptr.dtype.element_ty), mask=tile)
    tl.store(part_ptr + ps * R * K + rr[None, :] * K + ks[:, None], acc * inv_keep,
             mask=(rr[None, :] < R) & (ks[:, None] < K))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Launchers. Inputs are 2-D; the op layer (ftkernels/ops/lora_linear.py) checks shapes and dtypes.


def _prec(dtype: torch.dtype) -> str:
    """fp32 dots at float32 accuracy, as torch's matmul (TF32 only where the user allowed it for
    matmuls): 3xTF32 on tensor cores. IEEE fp32 dots run on FMA units and spilled registers: the
    dropout backward took 0.4-4.5 ms at BERT/Llama sizes on an H100, 20-50x cuBLAS."""
    if dtype != torch.float32:
        # 16-bit dots ignore it; fp32 dots on factors of 16-bit data (LoReFT's t and s) get TF32,
        # whose 10-bit rounding is finer than the 16-bit output's own.
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _br(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def lora_down(x, a, seed, p, out_dtype=None):
    """``u = D(x) A^T * 1/(1-p)``: x ``[M, K]``, A ``[r, K]`` -> u ``[M, r]`` in ``out_dtype`` (x's by
    default; fp32 accumulation either way)."""
    M, K = x.shape
    R = a.shape[0]
    u = torch.empty((M, R), device=x.device, dtype=out_dtype or x.dtype)
    BM, BK, stages = _down_blocks(x.dtype)
    _lora_down_kernel[(triton.cdiv(M, BM),)](
        x, a, u, seed, M, K, R, x.stride(0), x.stride(1), a.stride(0), a.stride(1), u.stride(0), u.stride(1),
        dropout_threshold(p), 1.0 / (1.0 - p),
        DROPOUT=p > 0, PREC=_prec(x.dtype), BM=BM, BK=BK, BR=_br(R), num_warps=4, num_stages=stages,
    )  # fmt: skip
    return u


def lowrank_gemm(x, w_op, bias, u, v_op, scale, seed=None, p=0.0):
    """``out = x @ w_op + bias + scale * mask?(u @ v_op)``: x ``[M, K]``, w_op ``[K, N]`` (any
    strides, e.g. ``W.t()``), u ``[M, r]``, v_op ``[r, N]``; the mask (dropout stream over the output's
    (row, column)) applies when ``p > 0``."""
    M, K = x.shape
    N = w_op.shape[1]
    R = u.shape[1]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    seed_t = seed if seed is not None else out  # unused pointer when DROPOUT is off

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    _lowrank_gemm_kernel[grid](
        x, w_op, bias if bias is not None else out, u, v_op, out, seed_t, M, N, K, R,
        x.stride(0), x.stride(1), w_op.stride(0), w_op.stride(1), u.stride(0), u.stride(1),
        v_op.stride(0), v_op.stride(1), out.stride(0), out.stride(1),
        float(scale), dropout_threshold(p),
        HAS_BIAS=bias is not None, DROPOUT=p > 0, PREC=_prec(x.dtype), BR=_br(R),
    )  # fmt: skip
    return out


_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU, cached (the property lookup is host time on every call)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _down_blocks(dtype: torch.dtype) -> tuple[int, int, int]:
    """(BM, BK, pipeline stages) of ``lora_down``: 16-row blocks, 8 KB of x per stage. 64-row blocks
    gave M/64 programs (64 at M=4096, for 132 SMs on an H100) and ran at ~0.6 TB/s. ptxas (triton
    3.6, sm_90a, 4 warps) keeps these spill-free: 48 registers in 16-bit (72 with dropout), 243 in
    fp32 (3xTF32 splits its operands; 64-row fp32 blocks spilled)."""
    if INTERPRET:
        return 16, 32, 1
    return (16, 128, 3) if dtype == torch.float32 else (16, 256, 4)


def row_blocks() -> tuple[int, int]:
    """(BM, BK) of the split-M column-block grad_A kernel (its default; the fused dgrad uses 32 rows)."""
    return (32, 32) if INTERPRET else (64, 128)


def split_m(M: int, K: int, BM: int, BK: int, device: torch.device) -> int:
    """Row splits of a kernel gridded by column blocks: about 2 programs per SM, each split writing
    its own fp32 partials (2 under the interpreter, to exercise the reduction)."""
    if INTERPRET:
        return 2
    return max(1, min(triton.cdiv(M, BM), triton.cdiv(2 * _sm_count(device), triton.cdiv(K, BK))))


def lora_grad_a(x, v, a, seed, p, grad_x=None):
    """``grad_A = v^T D(x) * 1/(1-p)`` (``[r, K]``); with ``grad_x``, also ``grad_x += D'(v A)`` in place."""
    M, K = x.shape
    R = a.shape[0]
    # With the fused dgrad, 32-row blocks and 8 warps: the 64-row, 4-warp blocks took 236 registers
    # in 16-bit and spilled 216 bytes in fp32 (ptxas, triton 3.6, sm_90a); these take 102 and 128.
    BM, BK = row_blocks()
    warps, stages = 4, 3
    if grad_x is not None and not INTERPRET:
        BM, warps, stages = 32, 8, 2
    split = split_m(M, K, BM, BK, x.device)
    part = torch.empty((split, R, K), device=x.device, dtype=torch.float32)
    gx = grad_x if grad_x is not None else x
    _lora_grad_a_kernel[(triton.cdiv(K, BK), split)](
        x, v, a, gx, part, seed, M, K, R,
        x.stride(0), x.stride(1), v.stride(0), v.stride(1), a.stride(0), a.stride(1), gx.stride(0), gx.stride(1),
        dropout_threshold(p), 1.0 / (1.0 - p),
        DX=grad_x is not None, SPLIT=split, PREC=_prec(x.dtype), BM=BM, BK=BK, BR=_br(R), num_warps=warps,
        num_stages=stages,
    )  # fmt: skip
    return part.sum(0).to(a.dtype)


@triton.jit
def _keep_mask_kernel(seed_ptr, out_ptr, M, K, thr, BM: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    ks = tl.program_id(1) * BK + tl.arange(0, BK)
    keep = _keep_tile(seed_ptr, rm, tl.program_id(1) * BK, thr, BM, BK)
    tl.store(out_ptr + rm[:, None] * K + ks[None, :], keep.to(tl.int8), mask=(rm[:, None] < M) & (ks[None, :] < K))


def keep_mask(seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """The dropout keep mask ``[M, K]`` (bool) that the kernels regenerate for this seed (tests, debugging)."""
    out = torch.empty((M, K), device=seed.device, dtype=torch.int8)
    _keep_mask_kernel[(triton.cdiv(M, 16), triton.cdiv(K, 32))](seed, out, M, K, dropout_threshold(p), BM=16, BK=32)
    return out.bool()


# ---------------------------------------------------------------------------------------------
# The op's GPU implementation: per shape, the fused Triton GEMMs or cuBLAS plus a second pass.

# Default cuBLAS: on the H100 it won every (shape, dropout) key timed so far, and `auto` compiles
# and autotunes 5-7 Triton GEMM configs per new shape (~10-20 s each: what kept the first e2e GPU run
# past its time limit). `auto` times both routes once per shape and keeps the faster.
GEMM_ROUTE = Route("FTKERNELS_LORA_GEMM", ("triton", "cublas"), default="cublas", safe="cublas")


def chosen() -> dict[tuple, str]:
    """The per-shape choices made so far (key: direction, M, N, K, r, dtype, dropout > 0)."""
    return GEMM_ROUTE.chosen()


def forward(x, weight, bias, lora_a, lora_b, scaling, dropout, seed, choice="auto"):
    """GPU forward of ``ftkernels::lora_linear_fwd``: returns (y, u)."""
    u = lora_down(x, lora_a, seed, dropout) if dropout > 0 else None

    def run_triton():
        uu = u if u is not None else lora_down(x, lora_a, seed, 0.0)
        return lowrank_gemm(x, weight.t(), bias, uu, lora_b.t(), scaling), uu

    def run_cublas():
        uu = u if u is not None else x @ lora_a.t()
        y = torch.nn.functional.linear(x, weight, bias)
        return y.addmm_(uu, lora_b.t(), alpha=scaling), uu

    key = ("fwd", x.shape[0], weight.shape[0], x.shape[1], lora_a.shape[0], x.dtype, dropout > 0)
    how = GEMM_ROUTE.pick(key, {"triton": run_triton, "cublas": run_cublas}, choice)
    return run_triton() if how == "triton" else run_cublas()


def _scaled_mm(a, b, scale):
    """``scale * (a @ b)`` in one GEMM (alpha; beta 0 ignores the uninitialized input): a launch less
    than ``(a @ b).mul_(scale)``, which matters in a host-bound step."""
    out = torch.empty((a.shape[0], b.shape[1]), device=a.device, dtype=a.dtype)
    return torch.addmm(out, a, b, beta=0, alpha=scale)


def backward(grad, x, weight, lora_a, lora_b, u, scaling, dropout, seed, need_x, choice="auto", grad_x_acc=None):
    """GPU backward of ``ftkernels::lora_linear_bwd``: returns (grad_x or empty, grad_A, grad_B). With
    ``grad_x_acc`` (x's shape, contiguous) grad_x is added into it (cuBLAS route, beta 1) and returned:
    layers that share x then write one buffer, with no per-layer grad_x and no sum of them."""
    grad_b = _scaled_mm(grad.t(), u, scaling)
    v = _scaled_mm(grad, lora_b, scaling)

    def run_triton():
        gx = lowrank_gemm(grad, weight, None, v, lora_a, 1.0 / (1.0 - dropout), seed, dropout) if need_x else None
        ga = lora_grad_a(x, v, lora_a, seed, dropout) if dropout > 0 else v.t() @ x
        return gx, ga

    def run_cublas():
        gx = (grad_x_acc.addmm_(grad, weight) if grad_x_acc is not None else grad @ weight) if need_x else None
        if dropout > 0:
            ga = lora_grad_a(x, v, lora_a, seed, dropout, grad_x=gx)
        else:
            ga = v.t() @ x
            if gx is not None:
                gx.addmm_(v, lora_a)
        return gx, ga

    key = ("bwd", x.shape[0], weight.shape[0], x.shape[1], lora_a.shape[0], x.dtype, dropout > 0)
    timed = need_x and grad_x_acc is None  # accumulating runs cuBLAS (timing it would add twice)
    how = GEMM_ROUTE.pick(key, {"triton": run_triton, "cublas": run_cublas}, choice) if timed else "cublas"
    gx, ga = run_triton() if how == "triton" else run_cublas()
    return (gx if gx is not None else x.new_empty((0,))), ga, grad_b
