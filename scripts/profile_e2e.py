"""Where an e2e training step spends its time, per case and variant, for the bench/NOTES.md breakdown
that issue #8 asks for: the gap to the floor explained by op class, host time and op counts.

    python scripts/profile_e2e.py                    # every case at the bench's size for this device
    python scripts/profile_e2e.py --case bert --quick --steps 3 --json out.json

The variants are the e2e suite's eager ones (``ftkernels.bench.e2e.eager_steps``): floor, PEFT eager,
ours, ours with each LoRA layer alone, and ours keeping every LoRA input. Per variant it reports:
- the wall time per step (CUDA events / perf_counter);
- the device time per step (GPU: the sum of kernel durations);
- time per class: GEMM/conv, attention, casts, optimizer (everything under ``Optimizer.step``),
  autograd (backward nodes' own time), other. This is kernel time on GPU and self host time on
  CPU; on CPU "python" is the profiled step time that no profiled event covers (module and
  forward Python). Our C++ kernels' inner BLAS calls count as GEMM, their own loops as "other".
- op counts per step: ATen calls, `_to_copy` casts, GEMM calls and autograd nodes run in backward.
  The issue's PEFT BERT profile counted ~750 casts and ~500 matmuls per step.
On a GPU, a wall time well above the device time means the step is host-bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from ftkernels.bench.common import time_ms
from ftkernels.bench.e2e import CASES, eager_steps

CLASSES = (
    ("ours (triton)", ("_lora_", "lowrank_gemm", "_reft_", "keep_mask", "rows_wgrad")),  # our kernels' names
    ("gemm/conv", ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "conv", "cudnn", "gemm")),
    ("attention", ("scaled_dot_product", "flash", "efficient_attention", "softmax")),
    ("casts", ("_to_copy", "to_copy", "copy_")),
    ("optimizer", ("fused_adam", "fused_optim_step", "fused_step_kernel", "step_count_kernel", "multi_tensor")),
)


def op_class(name: str) -> str:
    """The class of an ATen op or kernel name (first matching class of :data:`CLASSES`, else other)."""
    low = name.lower().removeprefix("aten::")
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def _in_optimizer(e) -> bool:
    while e is not None:
        if e.name.startswith("Optimizer.step#"):
            return True
        e = e.cpu_parent
    return False


def breakdown(prof, steps: int, cuda: bool, wall_ms: float) -> dict:
    """Per-step op-class times (ms) and op counts from a profile of ``steps`` steps taking ``wall_ms``
    each. CPU: self host time of every profiled event by class, "autograd" being the backward
    nodes' own time (engine and Python backward code), and "python" what no event covers (module
    and forward Python). GPU: kernel time by class of the kernel's name; optimizer kernels are
    classed by name too (multi_tensor/fused_adam; ours: the CUDA step kernel's name)."""
    per_class = defaultdict(float)
    aten = casts = gemms = nodes = 0
    kernel_us = host_us = 0.0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU:
            if cuda:  # a kernel: classed by its own name (cuBLAS/cuDNN, flash, elementwise, ours)
                dev = e.time_range.elapsed_us()
                kernel_us += dev
                per_class[op_class(e.name)] += dev / 1e3
            continue
        name = e.name
        opt = _in_optimizer(e)
        if name.startswith("autograd::engine::evaluate_function"):
            nodes += 1
            cls = "autograd"
        elif name.startswith("aten::"):
            aten += 1
            casts += name == "aten::_to_copy"
            gemms += op_class(name) == "gemm/conv"
            cls = op_class(name)
        else:
            cls = "other"
        cls = "optimizer" if opt else cls
        host_us += e.self_cpu_time_total
        if not cuda:
            per_class[cls] += e.self_cpu_time_total / 1e3
    out = {f"{k}_ms": round(v / steps, 3) for k, v in sorted(per_class.items())}
    if not cuda:
        out["python_ms"] = round(max(wall_ms - host_us / 1e3 / steps, 0.0), 3)
    out.update(
        aten_ops=round(aten / steps),
        casts=round(casts / steps),
        gemm_calls=round(gemms / steps),
        backward_nodes=round(nodes / steps),
    )
    if cuda:
        out["device_ms"] = round(kernel_us / 1e3 / steps, 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), action="append", help="default: every case")
    ap.add_argument("--quick", action="store_true", help="the tiny --quick sizes")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    results = {}
    for key in args.case or list(CASES):
        name, steps, _ = eager_steps(CASES[key], device, args.quick)
        results[name] = {}
        for variant, fn in steps.items():
            ms = time_ms(fn, device, warmup=3, reps=args.steps)
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                if cuda:
                    torch.cuda.synchronize()
                profiled = (time.perf_counter() - t0) * 1e3 / args.steps
            row = breakdown(prof, args.steps, cuda, profiled)
            results[name][variant] = dict(wall_ms=round(ms, 3), profiled_ms=round(profiled, 3), **row)
        print(f"\n## {name} ({device.type}, {args.steps} steps)")
        cols = sorted({c for r in results[name].values() for c in r}, key=_col_order)
        print("| variant | " + " | ".join(cols) + " |")
        print("| --- " * (len(cols) + 1) + "|")
        for variant, r in results[name].items():
            print(f"| {variant} | " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
        sys.stdout.flush()
        del steps
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device.type, torch=torch.__version__, results=results), f, indent=1)
    return 0


def _col_order(c: str) -> tuple:
    first = ["wall_ms", "profiled_ms", "device_ms", "python_ms", "autograd_ms"]
    return (first.index(c) if c in first else len(first), c)


if __name__ == "__main__":
    raise SystemExit(main())
