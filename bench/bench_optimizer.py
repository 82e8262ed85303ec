"""Optimizer-step benchmark.

    python bench/bench_optimizer.py [--device cpu|cuda] [--quick] [--out bench/results]

prints ms/step, speedup over the baselines measured side by side, and the ratio to the floor
(minimal bytes / measured copy bandwidth), and writes ``optimizer-<device>.json`` (the same as
``ftkernels bench --suite optimizer``, kept under the committed name). The micro cases
also run under pytest-benchmark: ``pytest bench/bench_optimizer.py --benchmark-only``.
"""

from __future__ import annotations

import torch

from ftkernels.bench import optimizer as suite
from ftkernels.bench import runner


def main(argv=None) -> int:
    return runner.script_main("optimizer", __doc__, __file__, argv)


# ---------------------------------------------------------------- pytest-benchmark micro cases
def _params(n=1 << 20, dtype=torch.float32):
    return suite._make([(n,)], torch.device("cpu"), dtype=dtype)


def test_fused_adamw_step(benchmark):
    opt = suite.FusedAdamW(_params(), lr=1e-4)
    benchmark(opt.step)


def test_torch_fused_adamw_step(benchmark):
    opt = torch.optim.AdamW(_params(), lr=1e-4, fused=True)
    benchmark(opt.step)


def test_fused_adamw_bf16_step(benchmark):
    opt = suite.FusedAdamW(_params(dtype=torch.bfloat16), lr=1e-4)
    benchmark(opt.step)


def test_torch_fused_adamw_bf16_step(benchmark):
    opt = torch.optim.AdamW(_params(dtype=torch.bfloat16), lr=1e-4, fused=True)
    benchmark(opt.step)


def test_fused_adamw_all_options_step(benchmark):
    opt = suite.FusedAdamW(_params(), lr=1e-4, **suite.ALL_OPTIONS)
    benchmark(opt.step)


if __name__ == "__main__":
    raise SystemExit(main())
