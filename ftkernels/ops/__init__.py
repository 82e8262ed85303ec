"""``torch.library`` custom ops (``ftkernels::*``) over the compiled extension and the Triton kernels."""

from . import lora_linear

__all__ = ["lora_linear"]
