"""Plain-PyTorch reference of the LoRA layers: the test oracle.

Written from the math with ordinary torch ops; the dropout mask comes from a NumPy re-implementation
of the Philox stream (``csrc/include/ftk/lora.h``), so it shares no code with the kernels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..optim.reference import draws16, philox_words

LORA_STREAM = 0x4C6F5241
DROPOUT_TAG = 0x46544B31


def lora_keep_mask(seed: int, rows: int, cols: int, p: float) -> torch.Tensor:
    """Keep flags ``[rows, cols]`` of the LoRA dropout stream: element (m, k) takes 16 bits of Philox
    at counter ``(k // 8, m, 0x4C6F5241, 0x46544B31)``, key ``seed`` (word ``(k % 8) // 2``, low half
    first); kept iff the draw ``>= ceil(float32(p) * 2^16)``."""
    groups = (cols + 7) // 8
    kg, m = np.meshgrid(np.arange(groups, dtype=np.uint64), np.arange(rows, dtype=np.uint64))
    draws = draws16(philox_words(seed, kg, m, np.full_like(kg, LORA_STREAM), np.full_like(kg, DROPOUT_TAG)))
    draws = draws.reshape(rows, groups * 8)[:, :cols]
    thr = math.ceil(float(np.float32(p)) * 65536.0)
    return torch.from_numpy(draws >= thr)


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling: float, dropout: float = 0.0, seed: int = 0):
    """``y = x W^T + b + scaling * (D(x) A^T) B^T`` with D = the LoRA dropout stream for ``seed``
    (kept values scaled by ``1/(1-p)``); x ``[..., K]``, W ``[N, K]``, A ``[r, K]``, B ``[N, r]``."""
    y = torch.nn.functional.linear(x, weight, bias)
    xd = x
    if dropout > 0:
        x2 = x.reshape(-1, x.shape[-1])
        keep = lora_keep_mask(seed, x2.shape[0], x2.shape[1], dropout).to(x.device)
        xd = (x2 * keep.to(x.dtype) / (1.0 - dropout)).reshape(x.shape)
    return y + scaling * ((xd @ lora_a.t()) @ lora_b.t())


def loreft_reference(h, rot, w, b, dropout: float = 0.0, seed: int = 0):
    """LoReFT ``h' = D(h + R^T (W h + b - R h))`` over the last dim, written row-vector style:
    ``h + (h W^T + b - h R^T) R``; h ``[..., d]``, R and W ``[r, d]``, b ``[r]``; D = the LoRA dropout
    stream over h's ``[numel / d, d]`` view (kept values scaled by ``1/(1-p)``), as pyreft's dropout
    on the intervention's output."""
    out = h + (h @ w.t() + b - h @ rot.t()) @ rot
    if dropout > 0:
        o2 = out.reshape(-1, out.shape[-1])
        keep = lora_keep_mask(seed, o2.shape[0], o2.shape[1], dropout).to(out.device)
        out = (o2 * keep.to(out.dtype) / (1.0 - dropout)).reshape(out.shape)
    return out


def lora_conv2d_reference(x, weight, bias, lora_a, lora_b, scaling: float, geom, dropout: float = 0.0, seed: int = 0):
    """``y = conv(x, W, b) + scaling * conv1x1(conv(D(x), A), B)``; geom ``(stride, padding,
    dilation, groups)`` of the base conv: A ``[r, in, *k]`` takes the stride, padding and
    dilation but is never grouped, B ``[out, r / groups, 1, ...]`` takes the groups (PEFT's layout).
    D = the LoRA dropout stream over x's ``[numel / x.shape[-1], x.shape[-1]]`` rows (kept values scaled
    by ``1/(1-p)``). x ``[N, in, *S]`` with 1 to 3 spatial dims (Conv1d / Conv2d / Conv3d)."""
    stride, padding, dilation, groups = geom
    f = torch.nn.functional
    conv = {3: f.conv1d, 4: f.conv2d, 5: f.conv3d}[x.dim()]
    xd = x
    if dropout > 0:
        keep = lora_keep_mask(seed, x.numel() // x.shape[-1], x.shape[-1], dropout).view(x.shape).to(x.device)
        xd = x * keep.to(x.dtype) / (1.0 - dropout)
    u = conv(xd, lora_a, None, stride, padding, dilation)
    return conv(x, weight, bias, stride, padding, dilation, groups) + scaling * conv(u, lora_b, groups=groups)
