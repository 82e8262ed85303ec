"""Hugging Face Trainer integration: a fused optimizer configured from ``TrainingArguments``.

    from transformers import Trainer
    from ftkernels.integrations.hf import create_optimizer

    opt = create_optimizer(model, args, l2sp=1e-3, grad_dropout=0.1)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))

The scheduler slot may stay None: Trainer builds its usual schedule on our optimizer. Trainer clips
gradients itself when ``args.max_grad_norm > 0``; pass ``max_grad_norm=...`` here and set
``args.max_grad_norm = 0`` to have the clipping fused into the step instead.

Trainer saves a model with fused LoRA layers whole, under the fused layers' parameter names: fine for
``resume_from_checkpoint``, but neither PEFT nor the plain architecture reads it. ``callbacks=
[AdapterCheckpoints()]`` also writes the adapter in PEFT's format into every checkpoint folder.
"""

from __future__ import annotations

import os
import sys
import warnings

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..optim import FusedAdagrad, FusedAdamW, FusedRMSprop, FusedSGD

OPTIMIZERS = {"adamw": FusedAdamW, "sgd": FusedSGD, "adagrad": FusedAdagrad, "rmsprop": FusedRMSprop}


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Trainable parameters that get weight decay, by Trainer's rule: all but biases and the
    weights of normalization layers (LayerNorm, RMSNorm, BatchNorm, GroupNorm...)."""
    names = set()
    for mod_name, mod in model.named_modules():
        is_norm = "norm" in type(mod).__name__.lower()
        for p_name, p in mod.named_parameters(recurse=False):
            if p.requires_grad and not is_norm and p_name != "bias" and not p_name.endswith("_bias"):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def create_optimizer(model: nn.Module, args, optimizer: str = "adamw", **regularizers):
    """A fused optimizer over ``model``'s trainable parameters with Trainer's settings: lr =
    ``args.learning_rate``, weight decay ``args.weight_decay`` on :func:`decay_parameter_names` only,
    and for AdamW betas ``(args.adam_beta1, args.adam_beta2)`` and eps ``args.adam_epsilon``.
    ``regularizers`` go to the optimizer (``l1``, ``l2sp``, ``ewc``, ``grad_dropout``,
    ``max_grad_norm``, ...). ``optimizer``: adamw | sgd | adagrad | rmsprop."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"create_optimizer: optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    decay = decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("create_optimizer: the model has no trainable parameter")
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=args.learning_rate, **regularizers)
    if optimizer == "adamw":
        kwargs.setdefault("betas", (args.adam_beta1, args.adam_beta2))
        kwargs.setdefault("eps", args.adam_epsilon)
    return OPTIMIZERS[optimizer](groups, **kwargs)


class AdapterCheckpoints(TrainerCallback):
    """A Trainer callback: each time Trainer saves ``<output_dir>/checkpoint-<step>``, the model's LoRA
    adapter goes beside it in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``, via
    :func:`ftkernels.save_adapter`, ``modules_to_save`` included), so every checkpoint loads with
    ``ftk.load_adapter(model, path)`` or PEFT's ``PeftModel.from_pretrained(base, path)``. Written by the
    main process only; a model without fused LoRA layers gets a warning and nothing written."""

    def on_save(self, args, state, control, model=None, **kwargs):
        from ..peft_compat import lora_modules, save_adapter

        if not state.is_world_process_zero or model is None:
            return control
        if not lora_modules(model):
            if not getattr(self, "_warned", False):
                warnings.warn("AdapterCheckpoints: the model has no fused LoRA layer; nothing written", stacklevel=2)
                self._warned = True
            return control
        path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        save_adapter(model, path)
        return control


def allow_quantized_training() -> None:
    """Let Trainer take a quantized model that holds ftkernels adapters (QLoRA through
    :class:`ftkernels.nn.LoRAQuantLinear`). Trainer refuses a quantized model as "purely quantized"
    unless transformers' own PEFT integration loaded adapters into it or it is a ``PeftModel``; it
    does not know ours. Installed (once, process-wide) by ``apply_lora`` / ``from_peft`` /
    ``load_adapter`` when they adapt a quantized model: the check then treats a quantized model with
    trainable fused LoRA layers as it treats one with PEFT's adapters; any other model gets
    transformers' check unchanged."""
    import transformers.trainer_utils as tu

    original = getattr(tu, "validate_quantization_for_training", None)
    if original is None or getattr(original, "_ftk", False):  # (older transformers check inline: nothing to wrap)
        return

    def validate_quantization_for_training(model):
        from ..peft_compat import lora_modules

        trains = any(q.requires_grad for m in lora_modules(model).values() for q in m.parameters(recurse=False))
        if not trains or not getattr(model, "is_quantized", False) or getattr(model, "_hf_peft_config_loaded", False):
            return original(model)
        model._hf_peft_config_loaded = True  # (for this check only: its "adapters are attached" flag)
        try:
            return original(model)
        finally:
            del model._hf_peft_config_loaded

    validate_quantization_for_training._ftk = True
    tu.validate_quantization_for_training = validate_quantization_for_training
    trainer = sys.modules.get("transformers.trainer")  # (imported already: it holds the old name)
    if trainer is not None and getattr(trainer, "validate_quantization_for_training", None) is original:
        trainer.validate_quantization_for_training = validate_quantization_for_training
