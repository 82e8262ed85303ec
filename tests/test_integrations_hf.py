"""Hugging Face Trainer with apply_lora and a fused optimizer; gradient checkpointing through our layers."""

import os

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


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps its state in process-wide singletons; each run here starts and ends clean."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()


def _accelerate_run(opt_cls, mixed_precision, steps, save_at=None, ckpt_dir=None):
    """A LoRA BERT trained through ``Accelerator.prepare`` (gradient accumulation over 2 micro-batches,
    ``accelerator.clip_grad_norm_``), optionally saving (``save_state``) after ``save_at`` micro-steps and
    reloading (``load_state``) after the last. Returns the trainable params and the accelerator."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, mixed_precision=mixed_precision, gradient_accumulation_steps=2)
    model = _bert_classifier()
    ftk.apply_lora(model, ["query", "value"], r=4, alpha=8, modules_to_save=["classifier"])
    opt = opt_cls([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    model, opt = acc.prepare(model, opt)
    data = _Data(16)
    for i in range(steps):
        batch = data[slice(4 * (i % 4), 4 * (i % 4) + 4)]
        with acc.accumulate(model):
            acc.backward(model(**batch).loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
        if save_at is not None and i + 1 == save_at:
            acc.save_state(str(ckpt_dir))
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return trained, acc, model, opt


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerate_prepare_matches_torch_adamw(fresh_accelerate, mixed_precision):
    """Accelerate wraps our optimizer (AcceleratedOptimizer: gradient accumulation, its own clipping,
    autocast) as it wraps torch's: the same trajectory as torch.optim.AdamW through the same loop."""
    ours, *_ = _accelerate_run(ftk.optim.FusedAdamW, mixed_precision, steps=8)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    ref, *_ = _accelerate_run(torch.optim.AdamW, mixed_precision, steps=8)
    start = {n: p for n, p in _bert_classifier().named_parameters()}
    for n, p in ref.items():
        torch.testing.assert_close(ours[n], p, atol=1e-6, rtol=1e-5)
        if n in start:  # the classifier (modules_to_save) trained: it moved
            assert not torch.equal(p, start[n])


def test_accelerate_save_and_load_state_round_trip(fresh_accelerate, tmp_path):
    """``save_state`` / ``load_state`` with a fused optimizer: the reloaded optimizer (which Accelerate
    has copied, so torch added ``differentiable`` to its defaults) takes the saved state back, and
    training from there retraces the run that never stopped."""
    saved, acc, model, opt = _accelerate_run(ftk.optim.FusedAdamW, "no", steps=4, save_at=4, ckpt_dir=tmp_path)
    moments = {id(p): opt.optimizer.state[p]["exp_avg"].clone() for p in opt.optimizer.state}
    data = _Data(16)
    for i in range(2):  # train on past the checkpoint, then go back to it
        with acc.accumulate(model):
            acc.backward(model(**data[4 * i : 4 * i + 4]).loss)
            opt.step()
            opt.zero_grad()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(params[n], saved[n]) for n in saved)
    acc.load_state(str(tmp_path))
    for n, p in params.items():
        assert torch.equal(p.detach(), saved[n]), n
    for p in opt.optimizer.state:
        assert torch.equal(opt.optimizer.state[p]["exp_avg"], moments[id(p)])


def test_trainer_resume_from_checkpoint_retraces_the_run(tmp_path):
    """Trainer saves our optimizer's state dict with each checkpoint and loads it on
    ``resume_from_checkpoint``: resuming at step 4 of 8 ends where the uninterrupted run ended."""
    import os
    import shutil

    from transformers import Trainer, TrainingArguments

    def run(resume=None):
        model = _bert_classifier()
        ftk.apply_lora(model, ["query", "value"], r=4, alpha=8, modules_to_save=["classifier"])
        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=5e-2,
            weight_decay=0.01, save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, max_grad_norm=0.0,
            seed=0, data_seed=0, disable_tqdm=True,
        )  # fmt: skip
        opt = create_optimizer(model, args, max_grad_norm=1.0, l2sp=1e-2)
        Trainer(model=model, args=args, train_dataset=_Data(), optimizers=(opt, None)).train(
            resume_from_checkpoint=resume
        )
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    full = run()
    shutil.rmtree(tmp_path / "checkpoint-8")
    resumed = run(resume=os.path.join(tmp_path, "checkpoint-4"))
    start = {n: p for n, p in _bert_classifier().named_parameters()}
    for n, p in full.items():
        torch.testing.assert_close(resumed[n], p, atol=1e-6, rtol=1e-5)
    assert not torch.equal(full["classifier.weight"], start["classifier.weight"])


def test_adapter_checkpoints_load_in_peft_and_back(tmp_path):
    """Every checkpoint Trainer writes also holds the PEFT-format adapter: PEFT's from_pretrained on a
    fresh base and ftk.load_adapter both give the trained model's outputs (the last checkpoint)."""
    import copy

    from peft import PeftModel
    from transformers import Trainer, TrainingArguments

    from ftkernels.integrations.hf import AdapterCheckpoints

    model = _bert_classifier()
    fresh = copy.deepcopy(model)
    ftk.apply_lora(model, ["query", "value"], r=4, alpha=8, modules_to_save=["classifier"])
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=5e-2,
        save_strategy="steps", save_steps=3, report_to=[], use_cpu=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[AdapterCheckpoints()]).train()
    for step in (3, 6):
        names = set(os.listdir(tmp_path / f"checkpoint-{step}"))
        assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= names
    ids = torch.randint(1, 50, (3, 12), generator=torch.Generator().manual_seed(5))
    model.eval()
    want = model(input_ids=ids).logits
    peft = PeftModel.from_pretrained(copy.deepcopy(fresh), str(tmp_path / "checkpoint-6")).eval()
    torch.testing.assert_close(peft(input_ids=ids).logits, want)
    ours = ftk.load_adapter(copy.deepcopy(fresh), str(tmp_path / "checkpoint-6")).eval()
    torch.testing.assert_close(ours(input_ids=ids).logits, want)
    early = ftk.load_adapter(copy.deepcopy(fresh), str(tmp_path / "checkpoint-3")).eval()
    assert not torch.allclose(early(input_ids=ids).logits, want)  # each checkpoint holds its own step


def test_adapter_checkpoints_warn_without_lora(tmp_path):
    from transformers import Trainer, TrainingArguments

    from ftkernels.integrations.hf import AdapterCheckpoints

    model = _bert_classifier()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, save_strategy="steps",
        save_steps=1, report_to=[], use_cpu=True,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="no fused LoRA layer"):
        Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[AdapterCheckpoints()]).train()
    assert "adapter_config.json" not in os.listdir(tmp_path / "checkpoint-1")


def test_from_peft_after_transformers_add_adapter_saves_and_trains(tmp_path):
    """transformers' own PEFT integration (model.add_adapter) marks the model as holding PEFT adapters;
    after from_peft those are gone, and the mark went with them: save_pretrained and Trainer's
    checkpoints raised (transformers looked for PEFT layers: "active_adapters" unbound)."""
    import copy

    from peft import LoraConfig, PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99,
    )  # fmt: skip
    base = LlamaForCausalLM(cfg).eval()
    model = copy.deepcopy(base)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, q in model.named_parameters():
            if "lora_B" in n:
                q.normal_()
    ids = torch.randint(0, 99, (2, 7))
    want = model(input_ids=ids).logits
    fused = ftk.from_peft(model)
    assert not fused._hf_peft_config_loaded and "peft_config" not in vars(fused)
    torch.testing.assert_close(fused(input_ids=ids).logits, want)
    fused.save_pretrained(str(tmp_path / "full"))  # (the whole model, under our layers' names)
    ftk.save_adapter(fused, str(tmp_path / "adapter"))
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter"))
    torch.testing.assert_close(back(input_ids=ids).logits, want)
    ds = [{"input_ids": torch.randint(0, 99, (8,)), "labels": torch.randint(0, 99, (8,))} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, save_steps=1, report_to=[])
    Trainer(model=fused.train(), args=args, train_dataset=ds).train()
    assert os.path.isdir(tmp_path / "out" / "checkpoint-2")
