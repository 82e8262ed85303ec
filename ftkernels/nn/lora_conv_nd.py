"""``LoRAConv1d`` / ``LoRAConv3d``: LoRA on a frozen ``nn.Conv1d`` / ``nn.Conv3d`` (PEFT's ``lora.Conv1d``
/ ``lora.Conv3d``), on the conv machinery of :class:`~ftkernels.nn.lora_conv2d.LoRAConvNd`.

Not to be confused with :class:`~ftkernels.nn.LoRAConv1D`: Hugging Face's ``Conv1D`` is a
transposed Linear (GPT-2), ``nn.Conv1d`` a real conv over a sequence (Whisper's and wav2vec2's
audio front ends, Mamba's depthwise conv, TCNs). ``nn.Conv3d``: video CNNs (torchvision's R3D /
R(2+1)D / S3D, X3D), VideoMAE's and ViViT's patch embeddings.
"""

from __future__ import annotations

from torch import nn

from .lora_conv2d import LoRAConvNd


class LoRAConv1d(LoRAConvNd):
    """LoRA on a frozen ``nn.Conv1d``: ``y = base(x) + scaling * B(A(dropout(x)))`` on x ``[N, C, L]``
    (or ``[C, L]``); ``lora_A`` ``[r, in, k]`` (the base's kernel, stride, padding, dilation),
    ``lora_B`` ``[out, r / groups, 1]``, DoRA magnitude ``[1, out, 1]``. Everything else as
    :class:`~ftkernels.nn.lora_conv2d.LoRAConvNd` (strategies, groups, dropout, DoRA, merge)."""

    _plain = nn.Conv1d
    _spatial = "L"


class LoRAConv3d(LoRAConvNd):
    """LoRA on a frozen ``nn.Conv3d``: ``y = base(x) + scaling * B(A(dropout(x)))`` on x ``[N, C, D, H, W]``
    (or unbatched; channels-last-3d too); ``lora_A`` ``[r, in, kd, kh, kw]``, ``lora_B``
    ``[out, r / groups, 1, 1, 1]``, DoRA magnitude ``[1, out, 1, 1, 1]``. Everything else as
    :class:`~ftkernels.nn.lora_conv2d.LoRAConvNd`."""

    _plain = nn.Conv3d
    _spatial = "D, H, W"
