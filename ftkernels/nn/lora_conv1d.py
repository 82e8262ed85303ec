"""``LoRAConv1D``: LoRA on Hugging Face's ``Conv1D`` (GPT-2's transposed linear), on the fused Linear op."""

from __future__ import annotations

from torch import Tensor, nn

from .lora_linear import LoRALinear


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (checked without importing transformers)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class LoRAConv1D(LoRALinear):
    """LoRA on a frozen Hugging Face ``Conv1D`` (weight stored ``[in, out]``: ``y = x W + b``).

    ``y = base(x) + scaling * dropout(x) @ lora_A^T @ lora_B^T`` with ``lora_A`` ``[r, in]`` and
    ``lora_B`` ``[out, r]``: PEFT's ``lora.Linear`` with ``fan_in_fan_out=True``. The fused Linear
    op runs on the transposed view of the weight (no copy); ``merge`` folds ``(scaling B A)^T`` into
    the ``[in, out]`` weight. Everything else is :class:`LoRALinear`'s.
    """

    @staticmethod
    def _check_base(base) -> None:
        if not is_hf_conv1d(base):
            raise TypeError(f"LoRAConv1D wraps a transformers Conv1D, got {type(base).__name__}")

    @staticmethod
    def _linear_weight_of(base) -> Tensor:
        return base.weight.t()

    # Conv1D's own names for its sizes (output features, input features), for code that reads them
    nf = property(lambda self: self.base.nf)
    nx = property(lambda self: self.base.nx)
