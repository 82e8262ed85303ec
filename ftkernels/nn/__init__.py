"""Drop-in modules: LoRA layers and the LoReFT intervention, forward and backward fused."""

from .lora_conv1d import LoRAConv1D
from .lora_conv2d import LoRAConv2d, LoRAConvNd
from .lora_conv_nd import LoRAConv1d, LoRAConv3d
from .lora_embedding import LoRAEmbedding
from .lora_linear import LoRALinear, lora_linear
from .lora_mha import LoRAMultiheadAttention
from .lora_params import LoRAParams
from .lora_quant import LoRAQuantLinear
from .loreft import LoReFT
from .masked import MaskedConv2d, MaskedLinear

__all__ = [
    "LoRAConv1D",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAConv3d",
    "LoRAConvNd",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "LoRAParams",
    "LoRAQuantLinear",
    "LoReFT",
    "MaskedConv2d",
    "MaskedLinear",
    "lora_linear",
]
