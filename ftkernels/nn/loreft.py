"""``LoReFT``: a low-rank representation intervention (Wu et al. 2024) with a fused kernel."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..ops import loreft as _ops
from .lora_linear import _FLOATS, call_seed


class OrthonormalRows(nn.Module):
    """Parametrization ``V [r, d] -> R [r, d]`` with orthonormal rows: the Q factor of the thin QR of
    ``V^T``, column signs fixed so that R's triangular factor has a positive diagonal (a smooth, unique
    map; ``right_inverse`` is the identity on orthonormal rows). O(d r^2) per call, so fine for
    d = 4096. Chosen over ``torch.nn.utils.parametrizations.orthogonal``, whose default map for
    non-square matrices (Householder) collapsed to R = 0 after AdamW steps in our tests, and whose
    other maps work on a d x d matrix."""

    def forward(self, v: Tensor) -> Tensor:
        q, tri = torch.linalg.qr(v.t())  # reduced: q [d, r]
        sign = torch.sign(torch.diagonal(tri))
        return (q * torch.where(sign == 0, torch.ones_like(sign), sign)).t()

    def right_inverse(self, rot: Tensor) -> Tensor:
        return rot


class LoReFT(nn.Module):
    """``h' = dropout(h + R^T (W h + b - R h))`` on the last dim of hidden states ``h [..., d]``.

    ``R`` (``[r, d]``, ``rotate_layer.weight``) has orthonormal rows, kept so by a parametrization
    (:class:`OrthonormalRows`: the optimizer moves the underlying parameter
    ``rotate_layer.parametrizations.weight.original`` and R is recomputed from it by a thin QR,
    orthonormal to float precision). ``W`` and ``b`` are ``learned_source`` (an ``nn.Linear(d, r)``),
    initialized as pyreft's. Forward and backward are one fused op (``ftkernels::loreft_fwd``): h is
    read, h' written, nothing of size ``[..., d]`` is saved but h itself; the dropout mask (pyreft
    applies dropout to the intervention's output) is regenerated from a seed. Parameters are fp32
    by default and may differ from h's dtype (bf16 hidden states): they are converted inside the op
    and get grads in their own dtype.
    """

    def __init__(self, d: int, r: int, dropout: float = 0.0, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(d, int) or not isinstance(r, int) or r < 1 or d < 1:
            raise ValueError(f"LoReFT: d and r must be positive ints, got d={d!r}, r={r!r}")
        if r > d:
            raise ValueError(f"LoReFT: r={r} exceeds d={d}: R cannot have {r} orthonormal rows in {d} dimensions")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoReFT: dropout must be in [0, 1), got {dropout}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"LoReFT: parameters must be float32 or float64 (they may differ from h's), got {dtype}")
        self.d, self.r, self.dropout = d, r, float(dropout)
        rotate = nn.Linear(d, r, bias=False, device=device, dtype=dtype)
        nn.init.orthogonal_(rotate.weight)
        parametrize.register_parametrization(rotate, "weight", OrthonormalRows())
        self.rotate_layer = rotate
        self.learned_source = nn.Linear(d, r, device=device, dtype=dtype)

    @property
    def rotation(self) -> Tensor:
        """R ``[r, d]`` with orthonormal rows (recomputed from the parametrization on each access)."""
        return self.rotate_layer.weight

    def forward(self, h: Tensor, seed: Tensor | None = None) -> Tensor:
        """h ``[..., d]`` -> h' of the same shape and dtype. ``seed`` (an int64 scalar tensor) fixes the
        dropout mask; a fresh one is drawn from the default generator when None."""
        if not isinstance(h, Tensor) or h.dtype not in _FLOATS:
            raise TypeError(f"LoReFT: h must be a floating tensor, got {getattr(h, 'dtype', type(h))}")
        if h.dim() == 0 or h.shape[-1] != self.d:
            raise ValueError(f"LoReFT: h has shape {tuple(h.shape)}, expected [..., {self.d}]")
        w = self.learned_source.weight
        if h.device != w.device:
            raise ValueError(f"LoReFT: h is on {h.device} but the intervention is on {w.device}")
        if h.device.type == "cuda" and h.dtype == torch.float64:
            raise TypeError("LoReFT: float64 runs on CPU only; use float32, bfloat16 or float16 on GPU")
        p = self.dropout if self.training else 0.0
        if seed is None:
            seed = call_seed(p, h.device)
        return _ops.loreft_apply(h, self.rotation, w, self.learned_source.bias, p, seed)

    def extra_repr(self) -> str:
        return f"d={self.d}, r={self.r}, dropout={self.dropout}"
