"""``LoRAMultiheadAttention``: LoRA on torch's ``nn.MultiheadAttention`` (torchvision's ViT, open_clip,
``nn.Transformer*`` layers), its packed q/k/v projection and its output projection through the fused
LoRA op."""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..integrations import opacus as _dp
from ._lora_common import FoldMixin, adapter_dtype, adopt_base, lora_scaling, peft_adapter, rng_kept, scaled_delta
from .lora_linear import _lora_linear


class LoRAMultiheadAttention(FoldMixin, nn.Module):
    """Drop-in replacement for a frozen ``nn.MultiheadAttention`` with LoRA on its packed input
    projection and on its output projection: the layer computes ``nn.MultiheadAttention`` with
    ``in_proj_weight + s B A`` and ``out_proj.weight + s B_o A_o`` (PEFT's ``lora.MultiheadAttention``,
    the same adapter shapes and file keys), every option of its forward included (masks,
    ``is_causal``, ``need_weights``, ``add_bias_kv``, ``add_zero_attn``, attention dropout,
    ``batch_first``, unbatched inputs).

    Shapes: ``lora_A`` ``[r, E]`` and ``lora_B`` ``[3E, r]`` (q, k, v rows stacked, as in_proj_weight),
    ``out_lora_A`` ``[r, E]`` and ``out_lora_B`` ``[E, r]``; ``scaling = alpha / r`` (``alpha / sqrt(r)``
    with rslora) for both. Unlike PEFT, which folds the adapters into the base weights before each
    call and takes them out after (so a frozen weight is re-rounded every step, and every step pays a
    dense weight gradient), the projections run through the fused LoRA op: the base weights are only
    read. LoRA dropout ``p`` applies to each projection's input on the adapter path, as in every LoRA
    layer (PEFT's merged form applies none). Separate q/k/v weights (``kdim``/``vdim`` != ``embed_dim``)
    and DoRA are refused, as in PEFT.
    """

    def __init__(
        self,
        base: nn.MultiheadAttention,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        rslora: bool = False,
        dora: bool = False,
    ):
        super().__init__()
        name = type(self).__name__
        self._check_base(base)
        if dora:
            raise NotImplementedError(f"{name}: DoRA on nn.MultiheadAttention is not supported (PEFT refuses it too)")
        self.scaling = lora_scaling(name, r, alpha, dropout, rslora)
        adopt_base(self, base)
        self.r, self.alpha, self.dropout, self.rslora = int(r), alpha, float(dropout), rslora
        w = base.in_proj_weight
        E = base.embed_dim
        kw = dict(device=w.device, dtype=adapter_dtype(w))
        self.lora_A = nn.Parameter(torch.empty(self.r, E, **kw))
        self.lora_B = nn.Parameter(torch.empty(3 * E, self.r, **kw))
        self.out_lora_A = nn.Parameter(torch.empty(self.r, E, **kw))
        self.out_lora_B = nn.Parameter(torch.empty(E, self.r, **kw))
        self.merged = False
        self.reset_parameters()

    @classmethod
    def _check_base(cls, base, out_proj: nn.Module | None = None) -> None:
        """Refuse what the layer cannot compute exactly (``out_proj``: the one that will be in place)."""
        name = cls.__name__
        if not isinstance(base, nn.MultiheadAttention):
            raise TypeError(f"{name} wraps an nn.MultiheadAttention, got {type(base).__name__}")
        if type(base).forward is not nn.MultiheadAttention.forward:
            raise TypeError(f"{name}: {type(base).__name__} overrides nn.MultiheadAttention.forward")
        if not base._qkv_same_embed_dim:
            raise NotImplementedError(
                f"{name}: kdim/vdim differ from embed_dim (separate q/k/v weights); only the packed in_proj_weight"
                " is supported (PEFT's lora.MultiheadAttention refuses it too)"
            )
        out_proj = base.out_proj if out_proj is None else out_proj
        if type(out_proj) not in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
            raise TypeError(f"{name}: out_proj is a {type(out_proj).__name__}, not an nn.Linear")
        for t in (base.in_proj_weight, out_proj.weight):
            if type(t) not in (Tensor, nn.Parameter) or not t.dtype.is_floating_point:
                raise TypeError(f"{name}: the base weights must be plain floating-point tensors, got {t.dtype}")

    # What nn.MultiheadAttention's users read (nn.TransformerEncoder checks these before its fused path).
    embed_dim = property(lambda self: self.base.embed_dim)
    num_heads = property(lambda self: self.base.num_heads)
    head_dim = property(lambda self: self.base.head_dim)
    kdim = property(lambda self: self.base.kdim)
    vdim = property(lambda self: self.base.vdim)
    batch_first = property(lambda self: self.base.batch_first)
    _qkv_same_embed_dim = property(lambda self: self.base._qkv_same_embed_dim)
    in_proj_weight = property(lambda self: self.base.in_proj_weight)
    in_proj_bias = property(lambda self: self.base.in_proj_bias)
    out_proj = property(lambda self: self.base.out_proj)
    bias_k = property(lambda self: self.base.bias_k)
    bias_v = property(lambda self: self.base.bias_v)
    add_zero_attn = property(lambda self: self.base.add_zero_attn)

    def merge_masks(self, *args, **kwargs):
        return self.base.merge_masks(*args, **kwargs)

    # ---- forward -------------------------------------------------------------------------------

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention.forward`` (same arguments, shapes and returns: ``(output, weights or
        None)``) with the adapted projections. query ``[L, N, E]`` (``[N, L, E]`` with batch_first, or
        ``[L, E]``), key / value ``[S, N, E]``."""
        base = self._modules["base"]
        if self._forward_hooks:
            _dp.hooked(self)  # Opacus: its rule for this layer (a clear refusal) is registered
        if self.merged or self.disabled:
            return base(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError(f"{type(self).__name__}: NestedTensor inputs are not supported; pass padded tensors")
        is_batched = query.dim() == 3
        key_padding_mask = _canonical_padding_mask(key_padding_mask, attn_mask, query.dtype)
        attn_mask = _canonical_attn_mask(attn_mask, query.dtype)
        if base.batch_first and is_batched:  # (transposes that keep "query is key is value")
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (t.transpose(1, 0) for t in (query, key))
                    value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        out, weights = self._attend(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
        if base.batch_first and is_batched:
            return out.transpose(1, 0), weights
        return out, weights

    def _project(self, x: Tensor, rows: slice | None, weight: Tensor, bias: Tensor | None, p: float) -> Tensor:
        """x ``[..., E]`` through in_proj's rows ``rows`` (None: all) with their adapter:
        ``x W^T + b + s D(x) A^T B^T``."""
        lora_b = self.lora_B
        if rows is not None:  # row blocks are views: B's gradient is assembled by autograd
            weight, bias, lora_b = weight[rows], None if bias is None else bias[rows], lora_b[rows]
        return _lora_linear(x, weight, bias, self.lora_A, lora_b, self.scaling, p, None)

    def _in_projection(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """torch's ``_in_projection_packed`` with the adapted weight: one fused call when q, k and v are
        one tensor (self-attention), two when k is v (cross-attention), else three."""
        base = self._modules["base"]
        w, b, E = base.in_proj_weight, base.in_proj_bias, q.size(-1)
        p = self.dropout if self.training else 0.0
        if k is v:
            if q is k:
                proj = self._project(q, None, w, b, p)
                proj = proj.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
                return proj[0], proj[1], proj[2]
            q_proj = self._project(q, slice(0, E), w, b, p)
            kv = self._project(k, slice(E, 3 * E), w, b, p)
            kv = kv.unflatten(-1, (2, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return q_proj, kv[0], kv[1]
        return tuple(self._project(t, slice(i * E, (i + 1) * E), w, b, p) for i, t in enumerate((q, k, v)))

    def _out_projection(self, x: Tensor) -> Tensor:
        out = self._modules["base"].out_proj
        p = self.dropout if self.training else 0.0
        return _lora_linear(x, out.weight, out.bias, self.out_lora_A, self.out_lora_B, self.scaling, p, None)

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal):
        """``F.multi_head_attention_forward`` (torch 2.x, packed weights, no static k/v) with the
        projections replaced: the same ops in the same order, so masks, dropout draws and autocast
        behave as in torch. Inputs seq-first ``[L, N, E]`` or unbatched ``[L, E]``."""
        base = self._modules["base"]
        num_heads = base.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        key_padding_mask = _canonical_padding_mask(key_padding_mask, attn_mask, query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method"
                " `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA's is_causal stands for the mask
        else:
            attn_mask = _canonical_attn_mask(attn_mask, query.dtype)
            if key_padding_mask is not None:
                is_causal = False
        if embed_dim != base.embed_dim:
            raise ValueError(f"{type(self).__name__}: expected embedding dimension {base.embed_dim}, got {embed_dim}")
        head_dim = embed_dim // num_heads
        if key.shape != value.shape:
            raise ValueError(
                f"{type(self).__name__}: key shape {tuple(key.shape)} does not match value's {tuple(value.shape)}"
            )
        q, k, v = self._in_projection(query, key, value)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
                    )
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be"
                        f" {(bsz * num_heads, tgt_len, src_len)}."
                    )
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if base.bias_k is not None and base.bias_v is not None:
            k = torch.cat([k, base.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, base.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if base.add_zero_attn:
            zeros = (bsz * num_heads, 1, head_dim)
            k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
            v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise ValueError(
                    f"{type(self).__name__}: key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected"
                    f" {(bsz, src_len)}"
                )
            key_padding_mask = (
                key_padding_mask.view(bsz, 1, 1, src_len)
                .expand(-1, num_heads, -1, -1)
                .reshape(bsz * num_heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = base.dropout if self.training else 0.0

        if need_weights:
            _, _, e = q.shape
            q_scaled = q * math.sqrt(1.0 / float(e))
            if is_causal and attn_mask is None:
                raise RuntimeError("is_causal is not implemented for need_weights=True without attn_mask")
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v)
            out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self._out_projection(out).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
            return out, weights
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = self._out_projection(out).view(tgt_len, bsz, -1)
        if not is_batched:
            out = out.squeeze(1)
        return out, None

    # ---- merging -------------------------------------------------------------------------------

    @property
    def dora(self) -> bool:
        return False

    def _merge_blocker(self) -> str | None:
        """Why :meth:`merge` cannot fold the adapters into the base weights, or None."""
        base = self.base
        if parametrize.is_parametrized(base) or parametrize.is_parametrized(base.out_proj):
            return "its base weights are parametrized, which cannot store a merged weight"
        return None

    def delta_weights(self) -> tuple[Tensor, Tensor]:
        """``(s B A [3E, E], s B_o A_o [E, E])`` in fp32 (fp64 for fp64 adapters)."""
        pairs = ((self.lora_B, self.lora_A), (self.out_lora_B, self.out_lora_A))
        return tuple(scaled_delta(b, a, self.scaling) for b, a in pairs)

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        d_in, d_out = self.delta_weights()
        for w, d in ((self.base.in_proj_weight, d_in), (self.base.out_proj.weight, d_out)):
            w.copy_((w.to(d.dtype) + sign * d).to(w.dtype))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's init: each A Kaiming-uniform (a = sqrt(5)), each B zero, so the layer starts as its base."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.reset_parameters: the adapter is merged; unmerge() first")
        for a, b in ((self.lora_A, self.lora_B), (self.out_lora_A, self.out_lora_B)):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    @classmethod
    def from_peft_layer(cls, layer, adapter_name: str | None = None) -> LoRAMultiheadAttention:
        """A fused layer over a PEFT ``lora.MultiheadAttention``'s base (shared) with copies of both
        adapters. The base's ``out_proj`` is still PEFT's ``lora.Linear`` here; ``from_peft`` puts the
        plain Linear back when it installs the layer (:meth:`adopt_plain_out_proj`). A merged PEFT
        layer is refused (unmerge it first)."""
        ad = peft_adapter(layer, adapter_name)
        mha, peft_out = ad.base, ad.base.out_proj
        if ad.merged or getattr(peft_out, "merged", False):
            raise NotImplementedError(
                "from_peft_layer: the PEFT MultiheadAttention adapter is merged; unmerge it (unmerge_adapter()) first"
            )
        out = peft_adapter(peft_out, ad.name)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        cls._check_base(mha, out.base)
        adopt_base(new, mha)
        new.r, new.alpha, new.dropout, new.scaling, new.rslora = ad.r, ad.alpha, ad.dropout, ad.scaling, ad.rslora
        new.lora_A, new.lora_B, new.merged = ad.lora_A, ad.lora_B, False
        new.out_lora_A, new.out_lora_B = out.lora_A, out.lora_B
        new.__dict__["_peft_out_proj"] = out.base  # (not a submodule) installed by adopt_plain_out_proj
        return new

    def adopt_plain_out_proj(self) -> None:
        """Put the plain out_proj back in the base (after a conversion from PEFT, once the model is
        committed to the fused layers)."""
        plain = self.__dict__.pop("_peft_out_proj", None)
        if plain is not None:
            self.base.out_proj = plain

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, r={self.r}, alpha={self.alpha}, "
            f"dropout={self.dropout}, rslora={self.rslora}, merged={self.merged}"
        )


def _canonical_padding_mask(key_padding_mask, attn_mask, dtype):
    """torch's canonical form of a key padding mask (a bool mask becomes a float one of -inf / 0)."""
    return F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=dtype,
    )


def _canonical_attn_mask(attn_mask, dtype):
    return F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=dtype, check_other=False
    )


@functools.cache
def peft_doubles_out_proj() -> bool:
    """Whether the installed PEFT's ``lora.MultiheadAttention`` adds the out_proj delta twice
    (``W_o + 2 s B_o A_o``, in forward and in merges: huggingface/peft#3774, PEFT 0.21 and before).
    Found by running it once on a tiny layer (float64, private RNG streams); False without PEFT."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return False
    with rng_kept(torch.device("cpu")), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        holder = nn.ModuleDict({"attn": nn.MultiheadAttention(4, 1).double()})
        peft_model = get_peft_model(holder, LoraConfig(target_modules=["attn"], r=1, init_lora_weights=False))
        layer = peft_model.base_model.model["attn"]
        x = torch.randn(3, 1, 4, dtype=torch.float64)
        with torch.no_grad():
            got = layer(x, x, x, need_weights=False)[0]
            fused = LoRAMultiheadAttention.from_peft_layer(layer)
            once = fused(x, x, x, need_weights=False)[0]
            fused.out_lora_B.mul_(2)
            twice = fused(x, x, x, need_weights=False)[0]
    return bool((got - twice).abs().max() < (got - once).abs().max())


def warn_if_peft_doubles(what: str, stacklevel: int = 3) -> None:
    """The warning for an adapter that came from (or goes to) PEFT's MultiheadAttention."""
    if peft_doubles_out_proj():
        warnings.warn(
            f"{what}: the installed PEFT's lora.MultiheadAttention adds its out_proj delta twice"
            " (W_o + 2 s B_o A_o; huggingface/peft#3774). The fused layer adds it once, as LoRA defines, so its"
            " outputs differ from that PEFT's for the same adapter. To keep what was trained under PEFT, double"
            " out_lora_B (layer.out_lora_B.data *= 2) after converting, and halve it before handing it back",
            stacklevel=stacklevel,
        )
