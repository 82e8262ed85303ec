"""``LoRAConv1D``: LoRA on Hugging Face's ``Conv1D`` (GPT-2's transposed linear), on the fused Linear op."""

from __future__ import annotations

from torch import Tensor, nn

from ._lora_common import check_plain_base
from .lora_linear import LoRALinear


def hf_conv1d_class(module: nn.Module) -> type | None:
    """``transformers.pytorch_utils.Conv1D`` when ``module`` is one or a subclass (weight-normed, etc.;
    checked without importing transformers), else None."""
    if not hasattr(module, "nf") or getattr(module, "weight", None) is None:
        return None
    return next(
        (c for c in type(module).__mro__ if c.__name__ == "Conv1D" and c.__module__.startswith("transformers")), None
    )


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` and its subclasses."""
    return hf_conv1d_class(module) is not None


class LoRAConv1D(LoRALinear):
    """LoRA on a frozen Hugging Face ``Conv1D`` (weight stored ``[in, out]``: ``y = x W + b``).

    ``y = base(x) + scaling * dropout(x) @ lora_A^T @ lora_B^T`` with ``lora_A`` ``[r, in]`` and
    ``lora_B`` ``[out, r]``: PEFT's ``lora.Linear`` with ``fan_in_fan_out=True``. The fused Linear
    op runs on the transposed view of the weight (no copy); ``merge`` folds ``(scaling B A)^T`` into
    the ``[in, out]`` weight. Everything else is :class:`LoRALinear`'s.
    """

    @staticmethod
    def _check_base(base) -> None:
        plain = hf_conv1d_class(base)
        if plain is None:
            raise TypeError(f"LoRAConv1D wraps a transformers Conv1D, got {type(base).__name__}")
        check_plain_base("LoRAConv1D", base, plain)

    @staticmethod
    def _linear_weight_of(base) -> Tensor:
        return base.weight.t()

    @staticmethod
    def _merge_view(weight: Tensor) -> Tensor:
        return weight.t()  # B A is [out, in]; the weight is stored [in, out]

    # Conv1D's own names for its sizes (output features, input features), for code that reads them
    nf = property(lambda self: self.base.nf)
    nx = property(lambda self: self.base.nx)
