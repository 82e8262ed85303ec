"""Per-kernel GPU times of our Triton kernels next to their bytes floor and the torch/cuBLAS pieces
they replace, at the benchmark shapes: what a suite-level miss breaks down into.

Groups (``--only`` picks some): ``lora`` (dropout down-projection, grad_A with and without the
fused dgrad, and the C++ node's mask kernel and GEMM-route pieces that stand in for them in eager
steps, at BERT and Llama widths), ``loreft`` (the launches of a LoReFT forward and backward
at 8192 x 4096, r4, with and without the FMA kernels' prefetch), ``masked`` (the rows-mode weight
gradient: the gathers, GEMMs in three layouts, zero fill, index_copy, the one-pass fill, the fused
GEMM, and the three routes).

    python scripts/diag_kernels.py [--quick] [--only lora,loreft,masked] [--json FILE]

Times are medians of ``triton.testing.do_bench`` (us); ``floor`` is bytes / the copy bandwidth
measured at start.
"""

# ruff: noqa: B023  (each loop's lambdas are timed inside that iteration)
from __future__ import annotations

import argparse
import json
import sys

import torch


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3


def _copy_gbps(dev) -> float:
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    return 2 * x.numel() / (_bench(lambda: y.copy_(x)) * 1e-6) / 1e9


def _node_dropout_cases(x, a, v, gx, seed, p):
    """The C++ node's dropout pieces on the GEMM route (csrc/autograd/lora_linear.cpp), each next to the
    Triton kernel it stands in for: (name, fn, passes over x)."""
    from ftkernels._ext import C

    mask = C().lora_mask_apply
    keep = 1 / (1 - p)
    u = torch.empty(x.shape[0], a.shape[0], device=x.device, dtype=x.dtype)
    ga = torch.empty_like(a)
    t = torch.empty_like(x)

    def bwd():  # grad_A = v^T D(x), grad_x += D'(v A), the mask regenerated
        xm = mask(x, seed, p, 1.0)
        torch.addmm(ga, v.t(), xm, beta=0, alpha=keep)
        mask(torch.mm(v, a, out=t), seed, p, keep, gx)

    return [
        ("node mask x", lambda: mask(x, seed, p, 1.0), 2),
        ("node mask-add dx", lambda: mask(t, seed, p, keep, gx), 3),
        ("node fwd (mask, GEMM)", lambda: torch.addmm(u, mask(x, seed, p, 1.0), a.t(), beta=0, alpha=keep), 3),
        ("node bwd (grad_A+dx)", bwd, 7),
    ]


def lora_rows(dev, quick, gbps):
    from ftkernels.ops.lora_linear import _cuda_mask
    from ftkernels.triton import lora_linear as tk

    node = _cuda_mask()  # the extension has the node's CUDA mask kernel

    rows = []
    shapes = [(4096, 768, 16)] if quick else [(4096, 768, 16), (4096, 3072, 16), (8192, 4096, 16)]
    for dtype in (torch.float32, torch.bfloat16):
        for M, K, R in shapes:
            x = torch.randn(M, K, device=dev, dtype=dtype)
            a = torch.randn(R, K, device=dev, dtype=dtype) * 0.05
            v = torch.randn(M, R, device=dev, dtype=dtype)
            gx = torch.randn(M, K, device=dev, dtype=dtype)
            seed = torch.tensor(123, device=dev)
            read = M * K * x.element_size() / gbps / 1e3  # one pass over x, us
            case = f"{str(dtype)[6:]} M{M} K{K} r{R}"
            for name, fn, passes in (
                ("lora_down p0.1", lambda: tk.lora_down(x, a, seed, 0.1), 1),
                ("cuBLAS x A^T", lambda: x @ a.t(), 1),
                ("lora_grad_a p0.1", lambda: tk.lora_grad_a(x, v, a, seed, 0.1), 1),
                ("lora_grad_a+dx p0.1", lambda: tk.lora_grad_a(x, v, a, seed, 0.1, grad_x=gx), 3),
                ("cuBLAS v^T x", lambda: v.t() @ x, 1),
                *(_node_dropout_cases(x, a, v, gx, seed, 0.1) if node else []),
            ):
                rows.append(dict(group="lora", case=case, kernel=name, us=_bench(fn), floor_us=passes * read))
    return rows


def loreft_rows(dev, quick, gbps):
    from ftkernels.triton import lora_linear as tl
    from ftkernels.triton import loreft as tk

    M, D, R = (2048, 1024, 4) if quick else (8192, 4096, 4)
    rows = []
    for p in (0.0, 0.1):
        h = torch.randn(M, D, device=dev, dtype=torch.bfloat16)
        g = torch.randn_like(h)
        rot = torch.linalg.qr(torch.randn(D, R, device=dev))[0].t().contiguous()
        w, b = torch.randn(R, D, device=dev) * 0.05, torch.randn(R, device=dev)
        seed = torch.tensor(7, device=dev)
        _, s = tk.forward(h, rot, w, b, p, seed)
        wmr = (w - rot).to(h.dtype)
        read = M * D * h.element_size() / gbps / 1e3
        case = f"bf16 {M}x{D} r{R} p{p}"
        for name, fn, passes in (
            ("fwd total", lambda: tk.forward(h, rot, w, b, p, seed), 2),
            ("ref: a lora_down pass over h", lambda: tl.lora_down(h, wmr, seed, 0.0, out_dtype=torch.float32), 1),
            ("bwd total", lambda: tk.backward(g, h, rot, w, s, p, seed), 3),
            ("fwd total, FMA_PREFETCH", lambda: tk.with_prefetch(tk.forward, h, rot, w, b, p, seed), 2),
            ("bwd total, FMA_PREFETCH", lambda: tk.with_prefetch(tk.backward, g, h, rot, w, s, p, seed), 3),
            ("bwd: lora_down t", lambda: tl.lora_down(g, rot.to(h.dtype), seed, p, out_dtype=torch.float32), 1),
            ("copy h (reference)", lambda: h.clone(), 2),
        ):
            rows.append(dict(group="loreft", case=case, kernel=name, us=_bench(fn), floor_us=passes * read))
    return rows


def masked_rows(dev, quick, gbps):
    from ftkernels import masks
    from ftkernels.nn.masked import _ROWS, _plan
    from ftkernels.triton.masked import fill_rows, gather_t, rows_gemm

    M, N, K = (2048, 1024, 1024) if quick else (8192, 4096, 4096)
    g = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    plan = _plan(masks.rows(torch.empty(N, K, device=dev), keep=0.1, by="random"))
    rows, pad, inv, zrows = plan["rows"], plan["gather"], plan["inv"], plan["zrows"]
    gk, gp, gt = g.index_select(1, rows), g.index_select(1, pad), gather_t(g, rows)
    out = torch.zeros(N, K, device=dev, dtype=g.dtype)
    res = gk.t() @ x
    case = f"bf16 M{M} K=N={N} {rows.numel()} rows"
    nr = rows.numel()

    def bytes_us(elements):  # memory-bound pieces: the elements moved at the measured copy rate
        return elements * g.element_size() / gbps / 1e3

    def gemm_us(n_rows):  # GEMMs of n_rows output rows at ~750 TFLOP/s
        return 2 * M * K * n_rows / 7.5e14 * 1e6

    pieces = (  # (name, call, floor in us)
        ("dense g^T x", lambda: g.t() @ x, gemm_us(N)),
        (f"gather [M, {nr}] (index_select)", lambda: g.index_select(1, rows), bytes_us(M * N + M * nr)),
        ("gather_t [NR, M] (triton)", lambda: gather_t(g, rows), bytes_us(M * N + M * nr)),
        (f"GEMM g_c^T x, ld {nr}", lambda: gk.t() @ x, gemm_us(nr)),
        (f"GEMM g_c^T x, ld {pad.numel()} (padded)", lambda: gp.t() @ x, gemm_us(nr)),
        ("GEMM gt @ x (gt [NR, M])", lambda: gt @ x, gemm_us(nr)),
        ("GEMM x^T g_c -> [K, NR]", lambda: x.t() @ gp, gemm_us(nr)),
        ("zero fill [N, K]", lambda: out.zero_(), bytes_us(N * K)),
        ("index_copy rows", lambda: out.index_copy_(0, rows, res), bytes_us(2 * nr * K)),
        ("fill_rows (triton)", lambda: fill_rows(res, inv, (N, K), g.dtype), bytes_us(N * K + nr * K)),
        ("rows_gemm on gt (triton, zeroing fused)", lambda: rows_gemm(gt, x, rows, zrows, (N, K)), gemm_us(nr)),
        *((f"{name} route", lambda f=f: f(g, x, plan, (N, K)), gemm_us(nr)) for name, f in _ROWS.items()),
    )
    return [dict(group="masked", case=case, kernel=n, us=_bench(f), floor_us=fl) for n, f, fl in pieces]


GROUPS = {"lora": lora_rows, "loreft": loreft_rows, "masked": masked_rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--only", default=",".join(GROUPS), help="comma-separated groups: " + ", ".join(GROUPS))
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("diag_kernels: needs a CUDA GPU (kernel times on the device)", file=sys.stderr)
        return 2
    unknown = set(args.only.split(",")) - set(GROUPS)
    if unknown:
        ap.error(f"unknown group(s) {sorted(unknown)}; choose from {list(GROUPS)}")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    gbps = _copy_gbps(dev)
    print(f"{torch.cuda.get_device_name(dev)}: copy {gbps:.0f} GB/s", flush=True)
    rows = []
    for name in args.only.split(","):
        for r in GROUPS[name](dev, args.quick, gbps):
            rows.append(r)
            print(
                f"{r['group']:7s} {r['case']:28s} {r['kernel']:28s} {r['us']:9.1f} us  floor {r['floor_us']:7.1f}",
                flush=True,
            )
    if args.json:
        env = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, copy_GBps=gbps)
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
