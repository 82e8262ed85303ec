"""``torch.library`` custom ops (``ftkernels::*``) over the compiled extension and the Triton kernels."""

from . import lora_dropout, lora_linear

__all__ = ["lora_dropout", "lora_linear"]
