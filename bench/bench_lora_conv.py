"""LoRA Conv2d benchmark on ResNet-50.

    python bench/bench_lora_conv.py [--device cpu|cuda] [--quick] [--out bench/results]

Per-layer table (every distinct residual-stage conv shape: frozen base conv, PEFT, ours with each
strategy and with ``auto``; forward + backward with grad_x) and a full training step of ResNet-50
with LoRA r=16 on every residual conv (forward, backward, AdamW), ours vs PEFT eager, side by side.
GPU: batch 64 at 224x224 with bf16 autocast; CPU: batch 8 at 112x112 fp32. Writes
``lora_conv-<device>.json`` (the same as ``ftkernels bench --suite lora_conv``).
"""

from __future__ import annotations

from ftkernels.bench import runner


def _per_layer(results):
    print("\nper layer (ms): base / PEFT / unmerged / merged / auto (strategy; measured best)")
    for row in results["suites"]["lora_conv"]["rows"]:
        if "strategy" in row:
            print(
                f"{row['case']:<40} {row['base_ms']:7.2f} {row['baseline_ms']:7.2f} {row['unmerged_ms']:7.2f} "
                f"{row['merged_ms']:7.2f} {row['ours_ms']:7.2f} ({row['strategy']}; {row['best']})"
            )


def main(argv=None) -> int:
    return runner.script_main("lora_conv", __doc__, __file__, argv, _per_layer)


if __name__ == "__main__":
    raise SystemExit(main())
