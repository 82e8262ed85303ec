"""Where one LoRA Linear training step spends its time: ours, hand-written cuBLAS and PEFT side by
side under ``torch.profiler`` (device and host time per op), for the bench/NOTES.md breakdown.

    python scripts/profile_lora_linear.py                       # the GPU headline shape
    python scripts/profile_lora_linear.py --M 256 --K 128 --N 128 --dtype float32   # any device
Prints, per variant, the wall time per step (CUDA events / perf_counter) and the profiler's top
ops by self device time (CPU: self CPU time) with their host time, which shows whether a variant
is host-bound (host time per step above its device time).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ftkernels.bench.common import layer_step, time_ms
from ftkernels.bench.lora_linear import HandWrittenModule, _peft_layer
from ftkernels.nn import LoRALinear


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--M", type=int, default=8192)
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.0, help="LoRA dropout (the hand-written variant needs 0)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = nn.Linear(args.K, args.N, device=device, dtype=dtype).requires_grad_(False)
    ours = LoRALinear(base, r=args.r, alpha=2 * args.r, dropout=args.p).to(dtype=dtype)
    with torch.no_grad():
        ours.lora_B.normal_(std=1e-3)
    peft_base = nn.Linear(args.K, args.N, device=device, dtype=dtype).requires_grad_(False)
    peft_base.load_state_dict(base.state_dict())
    layers = {"ours": ours, "PEFT": _peft_layer(peft_base, args.r, 2 * args.r, args.p, ours).to(dtype=dtype)}
    if args.p == 0:
        layers["hand-written"] = HandWrittenModule(ours)
    layers["frozen base"] = base
    x = torch.randn(args.M, args.K, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(args.M, args.N, device=device, dtype=dtype)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, layer in layers.items():
        fn = layer_step(layer, x, g)
        ms = time_ms(fn, device, warmup=3, reps=args.steps)
        with profile(activities=acts) as prof:
            for _ in range(args.steps):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"\n=== {name}: {ms:.3f} ms/step (M{args.M} K{args.K} N{args.N} r{args.r} p{args.p} {args.dtype})")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
