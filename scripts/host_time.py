"""Host time of one LoRA Linear layer's training step (forward + backward), per layer: our C++ node,
our Python autograd Functions (``FTKERNELS_LORA_NODE=0``'s path), PEFT and the frozen nn.Linear,
side by side in one process, alternating rounds. Shapes are tiny, so kernels cost next to nothing
and the time is host time: Python, autograd and ATen dispatch (bench/NOTES.md, "Session 11").

    python scripts/host_time.py                       # 8 layers, each after a LayerNorm (input rebuilt)
    python scripts/host_time.py --producer none --group 3   # q/k/v-style groups of 3 on one x
    python scripts/host_time.py --dropout 0.1          # BERT-style LoRA dropout
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import ftkernels as ftk
from ftkernels.bench.lora_linear import _peft_layer
from ftkernels.ops import lora_linear as ops


class Block(nn.Module):
    """``producer(x)`` then ``group`` layers on it, summed (a group of 1: one layer)."""

    def __init__(self, layers, producer):
        super().__init__()
        self.layers, self.producer = nn.ModuleList(layers), producer

    def forward(self, x):
        h = self.producer(x)
        return sum(layer(h) for layer in self.layers)


def build(kind, depth, group, k, r, producer, device, p=0.0):
    blocks = []
    for _ in range(depth):
        layers = []
        for _ in range(group):
            base = nn.Linear(k, k, device=device)
            ours = ftk.nn.LoRALinear(base, r=r, alpha=2 * r, dropout=p)
            with torch.no_grad():
                ours.lora_B.normal_()
            if kind == "PEFT":
                ours = _peft_layer(nn.Linear(k, k, device=device).requires_grad_(False), r, 2 * r, p, ours)
            elif kind == "frozen nn.Linear":
                ours = base
            layers.append(ours)
        prod = nn.LayerNorm(k, device=device) if producer == "layernorm" else nn.Identity()
        blocks.append(Block(layers, prod))
    model = nn.Sequential(*blocks)
    if kind.startswith("ours"):
        from ftkernels.nn.lora_group import group_shared_inputs

        group_shared_inputs(model)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--group", type=int, default=1, help="layers reading one x (grouped in ours)")
    ap.add_argument("--producer", default="layernorm", choices=["layernorm", "none"])
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    kinds = ["ours, C++ node", "ours, Python Functions", "PEFT", "frozen nn.Linear"]
    models = {k: build(k, args.depth, args.group, args.K, args.r, args.producer, device, args.dropout) for k in kinds}
    x = torch.randn(args.M, args.K, device=device, requires_grad=True)
    n_layers = args.depth * args.group

    def step(kind):
        ops._node_on = kind == "ours, C++ node"
        models[kind](x).sum().backward()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:
            step(k)
            sync()
            t = time.perf_counter()
            for _ in range(10):
                step(k)
            sync()
            times[k].append((time.perf_counter() - t) / 10 / n_layers * 1e6)
    ops._node_on = True
    shape = f"M{args.M} K{args.K} r{args.r} p{args.dropout}"
    what = f"{args.depth} blocks x {args.group} layer(s), producer {args.producer}, {shape}"
    print(f"{device.type}, {what}, {args.threads} thread(s): median us per layer (with its share of the block)")
    ref = statistics.median(times["PEFT"])
    for k in kinds:
        med = statistics.median(times[k])
        print(f"  {k:24s} {med:8.1f}   {med / ref:5.2f}x PEFT")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
