"""Masked-update benchmark.

    python bench/bench_masked.py [--device cpu|cuda] [--quick] [--out bench/results]

``MaskedLinear`` with 10% trainable rows (weight-gradient time vs dense, target <= 0.15x; whole
forward + backward) and BERT-base with its bottom 8 of 12 layers frozen by ``ftk.freeze`` vs full
training and vs hand-written ``requires_grad_(False)``, side by side. Writes
``masked-<device>.json`` (the same as ``ftkernels bench --suite masked``).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from ftkernels.bench import runner


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes and a tiny BERT")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    results = runner.run_suites(["masked"], device, quick=args.quick)
    print(runner.to_markdown(results))
    name = f"masked-{device.type}{'-quick' if args.quick else ''}.json"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
