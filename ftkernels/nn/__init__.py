"""Drop-in modules: LoRA layers with fused forward/backward."""

from .lora_conv1d import LoRAConv1D
from .lora_conv2d import LoRAConv2d
from .lora_linear import LoRALinear, lora_linear
from .masked import MaskedConv2d, MaskedLinear

__all__ = ["LoRAConv1D", "LoRAConv2d", "LoRALinear", "MaskedConv2d", "MaskedLinear", "lora_linear"]
