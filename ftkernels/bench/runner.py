"""``ftkernels bench``: run the suites on a device, measure the ceilings, write and compare results.

A suite is ``run(device, quick, ceilings, dtype=None) -> (rows, extra)`` (``dtype``: ``--dtype``, None for
each case's own); each row has at least ``case``,
``baseline``, ``baseline_ms``, ``ours_ms`` and ``floor_ms`` (the physical floor from the measured
ceilings), and may carry peak memory (``baseline_mem_MB``, ``ours_mem_MB``).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from . import e2e, lora_conv, lora_linear, loreft, masked, optimizer
from .common import DTYPES, copy_bandwidth, dtype_name, environment, format_table, time_ms

SUITES = {
    "lora_linear": lora_linear.run,
    "lora_conv": lora_conv.run,
    "masked": masked.run,
    "loreft": loreft.run,
    "optimizer": optimizer.run,
    "e2e": e2e.run,
}
# Suites the roadmap adds (issues #4-#8); named here so --suite explains their absence.
PLANNED: tuple[str, ...] = ()

COLUMNS = [
    ("suite", "suite"),
    ("case", "case"),
    ("baseline", "baseline"),
    ("baseline_ms", "baseline ms"),
    ("ours_ms", "ours ms"),
    ("speedup", "speedup"),
    ("baseline_mem_MB", "base MB"),
    ("ours_mem_MB", "ours MB"),
    ("baseline_saved_MB", "base saved MB"),
    ("ours_saved_MB", "ours saved MB"),
    ("ours_vs_floor", "ours/floor"),
    ("ours_mem_vs_floor", "ours MB/floor MB"),
    ("ours_vs_base", "ours/base layer"),
    ("vs_ideal", "ours/ideal"),
]


def measure_ceilings(device: torch.device, quick: bool = False, dtype: torch.dtype | None = None) -> dict:
    """Copy bandwidth (bytes/s, read + write) and dense matmul rate (flop/s) measured here.

    Matmul in ``dtype`` when given (the cases' dtype under ``--dtype``), else bf16 on GPU (the
    tensor-core rate) and fp32 on CPU; 8192^3 on GPU, 1024^3-2048^3 on CPU (256^3-512^3 for 16-bit
    types there, which CPUs without bf16/fp16 matrix units run ~100x slower than fp32).
    """
    if device.type == "cuda":
        n, default, nbytes = 8192, torch.bfloat16, 1 << 30
    else:
        n, default, nbytes = (1024 if quick else 2048), torch.float32, (64 << 20 if quick else 512 << 20)
    dtype = dtype or default
    if device.type != "cuda" and dtype.itemsize == 2:
        n //= 4
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=2, reps=5 if quick else 10)
    return {
        "copy_GBps": copy_bandwidth(device, nbytes) / 1e9,
        "matmul_TFLOPs": 2 * n**3 / (ms * 1e-3) / 1e12,
        "matmul_dtype": dtype_name(dtype),
    }


def finish_row(suite: str, row: dict) -> dict:
    """Derived columns: speedup = baseline/ours, ours_vs_floor = ours/floor (time), ours_mem_vs_floor
    = ours' peak memory over the floor's (where both were measured)."""
    row = {"suite": suite, **row}
    row["speedup"] = row["baseline_ms"] / row["ours_ms"]
    if row.get("floor_ms"):
        row["ours_vs_floor"] = row["ours_ms"] / row["floor_ms"]
    if row.get("ours_mem_MB") is not None and row.get("floor_mem_MB"):
        row["ours_mem_vs_floor"] = row["ours_mem_MB"] / row["floor_mem_MB"]
    return row


def run_suites(
    names, device: torch.device, quick: bool = False, progress=sys.stderr, dtype: torch.dtype | None = None
) -> dict:
    """Run the named suites; returns ``{"environment", "ceilings", "quick", "dtype", "suites": {name:
    {"rows", "extra"}}}``. ``dtype`` (``--dtype``) sets the per-layer suites' dtype; e2e keeps its own."""
    for name in names:
        if name not in SUITES:
            planned = " (planned, not built yet)" if name in PLANNED else ""
            raise ValueError(f"unknown benchmark suite {name!r}{planned}; available: {', '.join(SUITES)}")
    t0 = time.perf_counter()
    _progress(progress, 0, len(names) + 1, "measuring ceilings", t0)
    ceilings = measure_ceilings(device, quick, dtype)
    results = {
        "environment": environment(device),
        "ceilings": ceilings,
        "quick": quick,
        "dtype": dtype_name(dtype) if dtype is not None else None,
        "suites": {},
    }
    for k, name in enumerate(names):
        _progress(progress, k + 1, len(names) + 1, f"suite {name}", t0)
        rows, extra = SUITES[name](device, quick=quick, ceilings=ceilings, dtype=dtype)
        results["suites"][name] = {"rows": [finish_row(name, r) for r in rows], "extra": extra}
    _progress(progress, len(names) + 1, len(names) + 1, "done", t0)
    return results


def script_main(suite: str, doc: str, script: str, argv=None, extra_print=None) -> int:
    """The ``bench/bench_<suite>.py`` command line: run one suite on ``--device`` (default: the
    machine's), print the markdown table, write ``<suite>-<device>[-quick].json`` under ``--out``
    (default: ``results/`` beside ``script``, i.e. ``bench/results``)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    ap.add_argument("--dtype", choices=list(DTYPES), help="the cases' dtype (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(script)), "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    results = run_suites([suite], device, quick=args.quick, dtype=DTYPES.get(args.dtype))
    print(to_markdown(results))
    if extra_print is not None:
        extra_print(results)
    os.makedirs(args.out, exist_ok=True)
    tag = f"{'-' + args.dtype if args.dtype else ''}{'-quick' if args.quick else ''}"
    with open(os.path.join(args.out, f"{suite}-{device.type}{tag}.json"), "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    return 0


def _progress(stream, done: int, total: int, what: str, t0: float) -> None:
    if stream is None:
        return
    width = 24
    filled = int(width * done / total)
    stream.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what:<28} {time.perf_counter() - t0:6.1f}s"
    )
    if done == total:
        stream.write("\n")
    stream.flush()


def all_rows(results: dict) -> list[dict]:
    """Every suite's rows of a results dict, in suite order."""
    return [row for suite in results["suites"].values() for row in suite["rows"]]


def to_markdown(results: dict) -> str:
    """``results.md``: environment, the measured ceilings and one table row per case."""
    env, ceil = results["environment"], results["ceilings"]
    lines = [
        f"# ftkernels bench: {env['device']}",
        "",
        f"{env['date']} | torch {env['torch']} | triton {env['triton']} | ftkernels {env['ftkernels']} | "
        f"commit {env['git_commit']}" + (" | quick" if results.get("quick") else ""),
        "",
        f"Ceilings measured in this run: copy {ceil['copy_GBps']:.1f} GB/s, "
        f"{ceil['matmul_dtype']} matmul {ceil['matmul_TFLOPs']:.2f} TFLOP/s."
        + (f" Per-layer cases in {results['dtype']} (--dtype; e2e keeps its own)." if results.get("dtype") else ""),
        "",
        "| " + " | ".join(h for _, h in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in all_rows(results):
        cells = []
        for key, _ in COLUMNS:
            v = row.get(key)
            cells.append("-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(out_dir: str, results: dict) -> tuple[str, str]:
    """``results.json`` and ``results.md`` under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    js, md = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
    with open(js, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    with open(md, "w") as f:
        f.write(to_markdown(results))
    return js, md


def compare(path_a: str, path_b: str) -> str:
    """Table of ``ours_ms`` and ``speedup`` per (suite, case, baseline) in two result files, with the
    change. A case has one row per baseline (the floor, PEFT, ...): each is matched with its own."""
    with open(path_a) as f:
        a = json.load(f)
    with open(path_b) as f:
        b = json.load(f)

    def key(r):
        return r["suite"], r["case"], r.get("baseline")

    rows_a = {key(r): r for r in all_rows(a)}
    rows, seen = [], set()
    for r in all_rows(b):
        old = rows_a.get(key(r))
        seen.add(key(r))
        rows.append(
            {
                "suite": r["suite"],
                "case": r["case"],
                "baseline": r.get("baseline"),
                "A_ms": old["ours_ms"] if old else None,
                "B_ms": r["ours_ms"],
                "change": f"{(r['ours_ms'] / old['ours_ms'] - 1) * 100:+.1f}%" if old else "new",
                "A_speedup": old["speedup"] if old else None,
                "B_speedup": r["speedup"],
            }
        )
    for k, r in rows_a.items():
        if k not in seen:
            rows.append({"suite": k[0], "case": k[1], "baseline": k[2], "A_ms": r["ours_ms"], "change": "gone"})
    ea, eb = a["environment"], b["environment"]
    head = f"A: {ea['device']} {ea['date']}\nB: {eb['device']} {eb['date']}"
    cols = [
        ("suite", "suite"),
        ("case", "case"),
        ("baseline", "baseline"),
        ("A_ms", "A ms"),
        ("B_ms", "B ms"),
        ("change", "B vs A"),
        ("A_speedup", "A speedup"),
        ("B_speedup", "B speedup"),
    ]
    return head + "\n" + format_table(rows, cols)


def plot(results: dict, out_dir: str) -> list[str]:
    """PNG bar charts of speedup and peak memory per case (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    rows = all_rows(results)
    labels = [f"{r['suite']}: {r['case']}" for r in rows]
    paths = []
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    ax.barh(labels, [r["speedup"] for r in rows], color="tab:green")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speedup over baseline (x)")
    ax.set_title(results["environment"]["device"])
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "speedup.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    mem = [r for r in rows if r.get("ours_mem_MB") is not None]
    if mem:
        fig, ax = plt.subplots(figsize=(8, 0.6 * len(mem) + 1.5))
        y = range(len(mem))
        ax.barh([v + 0.2 for v in y], [r["baseline_mem_MB"] for r in mem], height=0.4, label="baseline")
        ax.barh([v - 0.2 for v in y], [r["ours_mem_MB"] for r in mem], height=0.4, label="ours")
        ax.set_yticks(list(y), [f"{r['suite']}: {r['case']}" for r in mem])
        ax.set_xlabel("peak memory (MB)")
        ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "memory.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
