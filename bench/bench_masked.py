"""Masked-update benchmark.

    python bench/bench_masked.py [--device cpu|cuda] [--quick] [--out bench/results]

``MaskedLinear`` with 10% trainable rows (weight-gradient time vs dense, target <= 0.15x; whole
forward + backward) and BERT-base with its bottom 8 of 12 layers frozen by ``ftk.freeze`` vs full
training and vs hand-written ``requires_grad_(False)``, side by side. Writes
``masked-<device>.json`` (the same as ``ftkernels bench --suite masked``).
"""

from __future__ import annotations

from ftkernels.bench import runner


def main(argv=None) -> int:
    return runner.script_main("masked", __doc__, __file__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
