"""Hugging Face Trainer with apply_lora and a fused optimizer; gradient checkpointing through our layers."""

import pytest
import torch

import ftkernels as ftk
from ftkernels.integrations.hf import create_optimizer, decay_parameter_names


def _bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=50)
    return BertForSequenceClassification(cfg)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 50, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] > 25).long()  # learnable from the first token

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_with_fused_optimizer_learns(tmp_path, checkpointing):
    from transformers import Trainer, TrainingArguments

    model = _bert_classifier()
    ftk.apply_lora(model, ["query", "value"], r=4, alpha=8, dropout=0.1, modules_to_save=["classifier"])
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=16, learning_rate=5e-2,
        weight_decay=0.01, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        gradient_checkpointing=checkpointing, max_grad_norm=0.0,
    )  # fmt: skip
    opt = create_optimizer(model, args, max_grad_norm=1.0)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    trainer = Trainer(model=model, args=args, train_dataset=_Data(), optimizers=(opt, None))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_gradient_checkpointing_gives_the_same_grads_with_dropout():
    grads = {}
    for ckpt in (False, True):
        model = _bert_classifier()
        ftk.apply_lora(model, ["query", "value", "dense"], r=4, alpha=8, dropout=0.2)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.randint(1, 50, (4, 9), generator=torch.Generator().manual_seed(3))
        torch.manual_seed(7)  # same dropout seeds; checkpointing replays the RNG state on recompute
        model(input_ids=ids, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, atol=1e-6, rtol=1e-5)


def test_decay_groups_follow_trainer_rule():
    model = _bert_classifier()
    ftk.apply_lora(model, ["query"], r=2, modules_to_save=["classifier"])
    names = decay_parameter_names(model)
    assert "classifier.weight" in names and "classifier.bias" not in names
    assert all("LayerNorm" not in n for n in names)
    assert any(n.endswith("lora_A") for n in names)
