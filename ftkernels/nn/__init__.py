"""Drop-in modules: LoRA layers with fused forward/backward."""

from .lora_conv1d import LoRAConv1D
from .lora_conv2d import LoRAConv2d
from .lora_linear import LoRALinear, lora_linear

__all__ = ["LoRAConv1D", "LoRAConv2d", "LoRALinear", "lora_linear"]
