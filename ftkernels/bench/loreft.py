"""LoReFT benchmark: one intervention's training-step work (forward + backward to h, R, W, b) of the
fused op against the plain-PyTorch formula as pyreft writes it (``h + (h W^T + b - h R^T) R``, then
``nn.functional.dropout``), side by side on the same inputs. R is given (the orthonormal
parametrization's cost is the same for both and not part of the intervention).

GPU: h of 8192 x 4096 bf16, r=4, fp32 parameters (the issue's case); CPU: 2048 x 1024 fp32
(quick: 512 x 256). Inputs rotate over 3 buffers so the 64 MB of h do not sit in the H100's L2.

Floors (bytes / measured copy bandwidth): the issue's (read h, write h' and grad_h: 3 passes over
``[M, d]``) in ``floor_ms``, and the minimum the math allows (forward reads h and writes h';
backward reads g and h and writes grad_h: 5 passes) in ``extra``.

On GPU each variant is also timed captured in CUDA graphs (one per input buffer, replayed in
turn): the device time, which the floor is about. Eager, both sides are bound by the host on the
H100 machine (1.2-1.3 ms of Python and launches per step against 0.26 ms of our kernels,
torch.profiler, 2026-11-23).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from ..graphed_step import on_side_stream
from ..ops import loreft as ops
from .common import dtype_name, peak_extra_mb, time_rounds_ms


def _reference(h, rot, w, b, p):
    out = h + ((h @ w.t().to(h.dtype) + b.to(h.dtype) - h @ rot.t().to(h.dtype)) @ rot.to(h.dtype))
    return F.dropout(out, p) if p > 0 else out


def run(device: torch.device, quick: bool, ceilings: dict, dtype: torch.dtype | None = None) -> tuple[list[dict], dict]:
    """Rows: fused LoReFT vs the PyTorch formula, dropout 0 and 0.1; h in ``dtype`` (default bf16 on GPU,
    fp32 on CPU; the intervention's own params stay fp32)."""
    if device.type == "cuda":
        M, d, own, reps = 8192, 4096, torch.bfloat16, 20
    else:
        M, d, own, reps = (512, 256, torch.float32, 5) if quick else (2048, 1024, torch.float32, 10)
    dtype = dtype or own
    r = 4
    bw = ceilings["copy_GBps"] * 1e9
    torch.manual_seed(0)
    rot = torch.linalg.qr(torch.randn(d, r, device=device))[0].t().contiguous().requires_grad_(True)
    w = torch.randn(r, d, device=device).mul_(d**-0.5).requires_grad_(True)
    b = torch.randn(r, device=device).requires_grad_(True)
    hs = [torch.randn(M, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    gs = [torch.randn(M, d, device=device, dtype=dtype) for _ in range(3)]
    nbytes = M * d * hs[0].element_size()
    rows = []
    turn = [0]  # the input rotation, shared by both variants

    def step(fn):
        def go():
            i = turn[0] = (turn[0] + 1) % 3
            h, g = hs[i], gs[i]
            h.grad = None
            for t in (rot, w, b):
                t.grad = None
            fn(h).backward(g)

        return go

    for p in (0.0, 0.1):
        seed = torch.randint(0, 2**62, (), device=device)
        fns = {
            "pytorch": step(lambda h, p=p: _reference(h, rot, w, b, p)),
            "ours": step(lambda h, p=p, seed=seed: ops.loreft_apply(h, rot, w, b, p, seed)),
        }
        ms = time_rounds_ms(fns, device, reps)
        rows.append(
            dict(
                case=f"LoReFT h {M}x{d} {dtype_name(dtype)} r{r} p{p}",
                baseline="PyTorch formula (pyreft's)",
                baseline_ms=ms["pytorch"],
                ours_ms=ms["ours"],
                floor_ms=3 * nbytes / bw * 1e3,
                baseline_mem_MB=peak_extra_mb(fns["pytorch"], device),
                ours_mem_MB=peak_extra_mb(fns["ours"], device),
                ours_vs_5pass=ms["ours"] / (5 * nbytes / bw * 1e3),
            )
        )
        if device.type == "cuda":
            try:
                graphed = {k: _graphed(fn, device) for k, fn in fns.items()}
            except Exception as e:  # a failed capture loses only these rows: report it, go on
                print(f"loreft: CUDA graph rows skipped: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                torch.cuda.synchronize(device)
                continue
            gms = time_rounds_ms(graphed, device, reps)
            rows.append(
                dict(
                    rows[-1],
                    case=rows[-1]["case"] + ", CUDA graph",
                    baseline="PyTorch formula, CUDA graph",
                    baseline_ms=gms["pytorch"],
                    ours_ms=gms["ours"],
                    baseline_mem_MB=None,
                    ours_mem_MB=None,
                    ours_vs_5pass=gms["ours"] / (5 * nbytes / bw * 1e3),
                )
            )
            del graphed
    return rows, {"floor_5pass_ms": 5 * nbytes / bw * 1e3}


def _graphed(step, device: torch.device):
    """``step`` (one training step on the next of 3 input buffers) captured once per buffer in CUDA
    graphs; the returned function replays them in turn (the same rotation as eager)."""

    def warm_up():  # every buffer once, outside capture (Triton compiles there)
        for _ in range(3):
            step()

    on_side_stream(warm_up, device)
    graphs = []
    for _ in range(3):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graphs.append(graph)
    turn = [0]

    def replay():
        turn[0] = (turn[0] + 1) % 3
        graphs[turn[0]].replay()

    return replay
