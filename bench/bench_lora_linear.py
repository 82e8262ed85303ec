"""LoRA Linear benchmark.

    python bench/bench_lora_linear.py [--device cpu|cuda] [--quick] [--out bench/results]

One training step's layer work (forward + backward with grad_x) of ``ftk.nn.LoRALinear`` against
the frozen base layer alone, PEFT eager (and PEFT + torch.compile on GPU) and the hand-written
cuBLAS + ``addmm_`` technique, side by side; time, peak memory (GPU), ratio to the base layer and
to the flop floor. Writes ``lora_linear-<device>.json`` (the same as ``ftkernels bench --suite
lora_linear``). GPU cases: M=8192, K=N=4096, r=16, bf16, dropout 0.1 and 0; sweeps over r, M and
the Llama-7B MLP shapes. Micro cases also run under pytest-benchmark:
``pytest bench/bench_lora_linear.py --benchmark-only``.
"""

from __future__ import annotations

import torch
from torch import nn

from ftkernels.bench import runner
from ftkernels.nn import LoRALinear


def main(argv=None) -> int:
    return runner.script_main("lora_linear", __doc__, __file__, argv)


# ---------------------------------------------------------------- pytest-benchmark micro cases
def _setup(p):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(512, 512), r=16, alpha=32, dropout=p)
    x = torch.randn(1024, 512, requires_grad=True)
    g = torch.randn(1024, 512)

    def step():
        x.grad = None
        layer.lora_A.grad = layer.lora_B.grad = None
        layer(x).backward(g)

    return step


def test_lora_linear_step_dropout(benchmark):
    benchmark(_setup(0.1))


def test_lora_linear_step_no_dropout(benchmark):
    benchmark(_setup(0.0))


def test_frozen_linear_step(benchmark):
    lin = nn.Linear(512, 512).requires_grad_(False)
    x = torch.randn(1024, 512, requires_grad=True)
    g = torch.randn(1024, 512)

    def step():
        x.grad = None
        lin(x).backward(g)

    benchmark(step)


if __name__ == "__main__":
    raise SystemExit(main())
