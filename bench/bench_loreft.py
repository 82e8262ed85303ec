"""LoReFT benchmark.

    python bench/bench_loreft.py [--device cpu|cuda] [--quick] [--out bench/results]

The fused LoReFT intervention's forward + backward against the plain PyTorch formula (pyreft's),
on h of 8192 x 4096 bf16 with r=4 on GPU, and its ratio to the floor. Writes ``loreft-<device>.json``
(the same as ``ftkernels bench --suite loreft``). Micro cases also run under pytest-benchmark:
``pytest bench/bench_loreft.py --benchmark-only``.
"""

from __future__ import annotations

import torch

from ftkernels.bench import runner
from ftkernels.bench.loreft import _reference
from ftkernels.nn import LoReFT


def main(argv=None) -> int:
    return runner.script_main("loreft", __doc__, __file__, argv)


# ---------------------------------------------------------------- pytest-benchmark micro cases
def _setup(fused: bool, p: float = 0.1):
    torch.manual_seed(0)
    m = LoReFT(512, 4, dropout=p)
    h = torch.randn(1024, 512, requires_grad=True)
    g = torch.randn(1024, 512)

    def step():
        h.grad = None
        m.zero_grad(set_to_none=True)
        rot = m.rotation  # the parametrization, the same cost for both
        src = m.learned_source
        out = m(h) if fused else _reference(h, rot, src.weight, src.bias, p)
        out.backward(g)

    return step


def test_loreft_fused_step(benchmark):
    benchmark(_setup(True))


def test_loreft_pytorch_step(benchmark):
    benchmark(_setup(False))


if __name__ == "__main__":
    raise SystemExit(main())
