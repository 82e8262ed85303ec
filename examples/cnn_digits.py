"""CNN fine-tuning on scikit-learn's bundled digits (8x8 images upsampled to 32x32, 10 classes):
replace the ResNet-18 head, train the head alone (feature extraction, ``ftk.freeze``), then
LoRA-tune the convolutions (``ftk.apply_lora`` on every conv, head kept trainable) with
``FusedAdamW``. The backbone is pretrained here on the first half of the classes, so the
fine-tune starts from features that are useful but not made for the new task.

    python examples/cnn_digits.py           # a couple of minutes on CPU
    python examples/cnn_digits.py --quick   # a few steps (CI): asserts the loss goes down
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import ftkernels as ftk
from ftkernels.bench.models import resnet18


def load_digits():
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - 0.5) / 0.5, torch.tensor(d.target)


def train(model, x, y, steps, lr, batch=64, seed=0):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = ftk.optim.FusedAdamW(params, lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few steps per phase (CI)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x, y = load_digits()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    old = y < 5
    n_test = len(y) // 4
    xtr, ytr, xte, yte = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    s_pre, s_head, s_lora = (10, 10, 10) if args.quick else (150, 100, 150)

    model = resnet18(num_classes=5)  # "pretraining" on digits 0-4
    train(model, x[old], y[old], s_pre, lr=3e-3)
    model.fc = nn.Linear(model.fc.in_features, 10)  # the new task: all 10 digits
    before = accuracy(model, xte, yte)
    ftk.freeze(model, trainable=["fc.*"], verbose=False)  # feature extraction: the head alone
    head_losses = train(model, xtr, ytr, s_head, lr=3e-3, seed=1)
    after_head = accuracy(model, xte, yte)
    ftk.apply_lora(model, ["conv1", "conv2"], r=8, alpha=16, modules_to_save=["fc"])
    lora_losses = train(model, xtr, ytr, s_lora, lr=2e-3, seed=2)
    after = accuracy(model, xte, yte)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"accuracy: new head untrained {before:.3f} -> head only {after_head:.3f} -> + LoRA convs {after:.3f}")
    print(
        f"loss head {head_losses[0]:.3f} -> {head_losses[-1]:.3f}; LoRA {lora_losses[0]:.3f} -> {lora_losses[-1]:.3f}"
    )
    print(f"trainable params with LoRA: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")
    return dict(head_losses=head_losses, lora_losses=lora_losses, before=before, after_head=after_head, after=after)


if __name__ == "__main__":
    main()
