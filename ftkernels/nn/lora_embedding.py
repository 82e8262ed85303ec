"""``LoRAEmbedding``: a frozen ``nn.Embedding`` plus a LoRA adapter (PEFT's ``lora.Embedding``).

Embeddings are a gather, not a GEMM, so there is no fused kernel here: the layer exists so that
``apply_lora`` / ``from_peft`` / ``save_adapter`` / ``load_adapter`` / merging take a model whose
adapter covers ``embed_tokens`` (continued pre-training, new tokens) along with its Linear layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._lora_common import LoRAMergeMixin, adapter_dtype, lora_scaling, peft_adapter, rng_kept
from .dora import dora_scale


class LoRAEmbedding(LoRAMergeMixin, nn.Module):
    """LoRA on a frozen embedding table ``W`` ``[num_embeddings, dim]``, PEFT's math and layout.

    ``y = base(x) + scaling * embed_scale * (A^T[x] @ B^T)``: ``lora_A`` ``[r, num_embeddings]`` (its
    columns are looked up by the indices x, with the base's ``padding_idx``, ``max_norm``, ...),
    ``lora_B`` ``[dim, r]``; x integer indices of any shape -> y ``[*x.shape, dim]``. PEFT's init
    (``lora_A`` zero, ``lora_B`` standard normal: the reverse of Linear's). ``embed_scale`` is the
    base's attribute of that name when it has one (Gemma's scaled embeddings multiply their output
    by it; PEFT scales the adapter by it too), else 1. The base layer's own forward gives its part,
    so such subclasses work. As in PEFT, LoRA dropout is not applied to embeddings (``dropout`` is
    kept for the adapter config only). ``merge`` folds ``scaling (B A)^T`` into ``W``; on a table
    tied to another layer (``tie_word_embeddings``) that changes the other layer too, so the
    model-level ``merge_lora`` / ``unload_lora(merge=True)`` refuse it.

    ``dora=True`` (PEFT's DoRA embedding): a trained magnitude ``lora_magnitude`` ``[dim]`` and
    ``y = mns * (base(x) + lora)`` with ``mns = m / ||W[:, j] + s (A^T B^T)[:, j]||`` over the vocabulary
    per embedding column (a constant for the gradient, as in PEFT; computed from ``W A^T`` ``[dim, r]``
    without copying the table, :func:`ftkernels.nn.dora.dora_weight_norm`); m starts at the table's
    column norms. Merging gives PEFT's merged table.
    """

    def __init__(
        self,
        base: nn.Embedding,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        rslora: bool = False,
        dora: bool = False,
    ):
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps an nn.Embedding, got {type(base).__name__}")
        if not base.weight.dtype.is_floating_point:
            raise TypeError(f"LoRAEmbedding: the table is {base.weight.dtype}; a floating-point one is needed")
        self.scaling = lora_scaling("LoRAEmbedding", r, alpha, dropout, rslora)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.dropout, self.rslora = int(r), alpha, float(dropout), rslora
        w = base.weight
        dtype = adapter_dtype(w)
        self.lora_A = nn.Parameter(torch.empty(self.r, base.num_embeddings, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(base.embedding_dim, self.r, device=w.device, dtype=dtype))
        if dora:  # PEFT's lora_magnitude_vector of an embedding: [dim]; set by reset_parameters
            self.lora_magnitude = nn.Parameter(torch.empty(base.embedding_dim, device=w.device, dtype=dtype))
        self.merged = False
        self.reset_parameters()

    weight = property(lambda self: self.base.weight)
    num_embeddings = property(lambda self: self.base.num_embeddings)
    embedding_dim = property(lambda self: self.base.embedding_dim)
    padding_idx = property(lambda self: self.base.padding_idx)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's embedding init, in place: ``lora_A`` zero, ``lora_B`` standard normal, a DoRA magnitude
        the table's column norms (the layer starts as its base). Raises when merged."""
        if self.merged:
            raise RuntimeError("LoRAEmbedding.reset_parameters: the adapter is merged; unmerge() first")
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)
        if self.dora:
            self.lora_magnitude.copy_(self.dora_row_norm())

    @staticmethod
    def _merge_view(weight: Tensor) -> Tensor:
        return weight.t()  # [dim, num]: where B A goes (a view; writes reach the table)

    def forward(self, x: Tensor) -> Tensor:
        """x integer indices ``[...]`` -> ``[..., dim]`` (the base alone when merged or disabled)."""
        if self.merged or self.disabled:
            return self.base(x)
        if not isinstance(x, Tensor) or x.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"LoRAEmbedding: x must be an int64/int32 index tensor, got {getattr(x, 'dtype', type(x))}")
        y = self.base(x)
        b = self.base
        # A's gradient stays dense for a sparse=True base (the frozen table gets none): a sparse one of
        # A^T cannot be transposed back to A's [r, num] layout (PEFT's layer fails there)
        after_a = F.embedding(x, self.lora_A.t(), b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq)
        lora = (after_a @ self.lora_B.t()) * self.scaling
        scale = getattr(b, "embed_scale", None)
        if scale is not None:
            lora = lora * torch.as_tensor(scale, device=lora.device).to(lora.dtype)
        if self.dora:  # PEFT's mns * base(x) + mns * lora, one product
            return (dora_scale(self.lora_magnitude, *self._dora_operands()) * (y + lora)).to(y.dtype)
        return (y + lora).to(y.dtype)

    @classmethod
    def from_peft_layer(cls, layer, adapter_name: str | None = None) -> LoRAEmbedding:
        """A ``LoRAEmbedding`` over a PEFT ``lora.Embedding``'s base layer (shared) with copies of its
        ``lora_embedding_A`` / ``lora_embedding_B``, r, alpha, scaling and dropout p (and a DoRA
        magnitude)."""
        ad = peft_adapter(layer, adapter_name)
        if not isinstance(ad.base, nn.Embedding):
            raise TypeError(f"from_peft_layer: the base layer is {type(ad.base).__name__}, not nn.Embedding")
        with rng_kept(ad.base.weight.device):  # the init is overwritten below
            new = cls(ad.base, r=ad.r, alpha=ad.alpha, dropout=ad.dropout, rslora=ad.rslora)
        new.scaling, new.lora_A, new.lora_B, new.merged = ad.scaling, ad.lora_A, ad.lora_B, ad.merged
        new._adopt_peft_extras(ad)
        return new

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, alpha={self.alpha}, merged={self.merged}" + (
            ", dora=True" if self.dora else ""
        )
