"""Drop-in modules: LoRA layers with fused forward/backward."""

from .lora_linear import LoRALinear, lora_linear

__all__ = ["LoRALinear", "lora_linear"]
