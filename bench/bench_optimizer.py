"""Optimizer-step benchmark.

    python bench/bench_optimizer.py [--device cpu|cuda] [--quick] [--out bench/results]

prints ms/step, speedup over the baselines measured side by side, and the ratio to the floor
(minimal bytes / measured copy bandwidth), and writes ``optimizer-<device>.json``. The micro cases
also run under pytest-benchmark: ``pytest bench/bench_optimizer.py --benchmark-only``.
"""

from __future__ import annotations

import argparse
import os

import torch

from ftkernels.bench import optimizer as suite
from ftkernels.bench.common import environment, write_results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows, extra = suite.run(device, quick=args.quick)
    env = {**environment(device), **extra}
    print(
        f"{env['device']} | torch {env['torch']} | {extra['numel'] / 1e6:.1f}M params | "
        f"copy {extra['copy_GBps']:.1f} GB/s"
    )
    print(suite.report(rows))
    name = f"optimizer-{device.type}{'-quick' if args.quick else ''}.json"
    write_results(os.path.join(args.out, name), env, rows, notes={"bytes_per_element": suite.__doc__})
    return 0


# ---------------------------------------------------------------- pytest-benchmark micro cases
def _params(n=1 << 20):
    return suite._make([(n,)], torch.device("cpu"))


def test_fused_adamw_step(benchmark):
    opt = suite.FusedAdamW(_params(), lr=1e-4)
    benchmark(opt.step)


def test_torch_fused_adamw_step(benchmark):
    opt = torch.optim.AdamW(_params(), lr=1e-4, fused=True)
    benchmark(opt.step)


def test_fused_adamw_all_options_step(benchmark):
    opt = suite.FusedAdamW(_params(), lr=1e-4, **suite.ALL_OPTIONS)
    benchmark(opt.step)


if __name__ == "__main__":
    raise SystemExit(main())
