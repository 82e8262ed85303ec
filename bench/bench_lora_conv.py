"""LoRA Conv2d benchmark on ResNet-50.

    python bench/bench_lora_conv.py [--device cpu|cuda] [--quick] [--out bench/results]

Per-layer table (every distinct residual-stage conv shape: frozen base conv, PEFT, ours with each
strategy and with ``auto``; forward + backward with grad_x) and a full training step of ResNet-50
with LoRA r=16 on every residual conv (forward, backward, AdamW), ours vs PEFT eager, side by side.
GPU: batch 64 at 224x224 with bf16 autocast; CPU: batch 8 at 112x112 fp32. Writes
``lora_conv-<device>.json`` (the same as ``ftkernels bench --suite lora_conv``).
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
    ap.add_argument("--quick", action="store_true", help="small batch and resolution, few repeats")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    results = runner.run_suites(["lora_conv"], device, quick=args.quick)
    print(runner.to_markdown(results))
    print("\nper layer (ms): base / PEFT / unmerged / merged / auto (strategy; measured best)")
    for row in results["suites"]["lora_conv"]["rows"]:
        if "strategy" in row:
            print(
                f"{row['case']:<40} {row['base_ms']:7.2f} {row['baseline_ms']:7.2f} {row['unmerged_ms']:7.2f} "
                f"{row['merged_ms']:7.2f} {row['ours_ms']:7.2f} ({row['strategy']}; {row['best']})"
            )
    name = f"lora_conv-{device.type}{'-quick' if args.quick else ''}.json"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
