"""LoRAEmbedding against PEFT's lora.Embedding: outputs and adapter grads on Llama (embed_tokens with
the attention projections), Gemma 3's scaled embedding and BERT (a padding_idx); adapter files both
ways, from_peft, merge / unload, bf16 tables with fp32 adapters, DoRA, bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import ftkernels as ftk


def llama():
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaModel(cfg), ["embed_tokens", "q_proj", "v_proj"]


def gemma3():  # Gemma3TextScaledWordEmbedding: the base multiplies by embed_scale, PEFT scales the adapter too
    from transformers import Gemma3TextConfig, Gemma3TextModel

    cfg = Gemma3TextConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=99, max_position_embeddings=32, sliding_window=8,
    )  # fmt: skip
    return Gemma3TextModel(cfg), ["embed_tokens", "o_proj"]


def bert():  # word_embeddings has padding_idx 0: its adapter row gets no gradient
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    return BertModel(cfg, add_pooling_layer=False), ["word_embeddings", "query"]


MODELS = {"llama": llama, "gemma3": gemma3, "bert": bert}


def _pair(kind, dtype=torch.float64):
    torch.manual_seed(0)
    base, targets = MODELS[kind]()
    base = base.to(dtype).eval()
    ours = ftk.apply_lora(copy.deepcopy(base), targets, r=4, alpha=8)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets)).eval()
    layers = ftk.peft_compat.lora_modules(ours)
    with torch.no_grad():
        for name, layer in layers.items():
            pl = peft.base_model.model.get_submodule(name)
            a, b = (pl.lora_embedding_A, pl.lora_embedding_B) if name.endswith("embeddings") or "embed" in name else (
                {k: v.weight for k, v in pl.lora_A.items()}, {k: v.weight for k, v in pl.lora_B.items()})  # fmt: skip
            a["default"].normal_()  # PEFT starts the embedding's A at zero, Linear's B: make both count
            b["default"].normal_(std=0.5)
            layer.lora_A.copy_(a["default"])
            layer.lora_B.copy_(b["default"])
    ids = torch.randint(1, 99, (3, 11))
    ids[0, :3] = 0  # BERT's padding index (a plain token elsewhere)
    return base, ours, peft, layers, ids


@pytest.mark.parametrize("kind", list(MODELS))
def test_matches_peft_outputs_and_grads(kind):
    base, ours, peft, layers, ids = _pair(kind)
    emb = [m for m in layers.values() if isinstance(m, ftk.nn.LoRAEmbedding)]
    assert len(emb) == 1
    y, yp = ours(input_ids=ids).last_hidden_state, peft(input_ids=ids).last_hidden_state
    assert (yp - base(input_ids=ids).last_hidden_state).abs().max() > 1e-3 * yp.abs().max()
    torch.testing.assert_close(y, yp, rtol=1e-10, atol=1e-12 * yp.abs().max().item())
    g = torch.randn_like(y)
    ours_p = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    peft_p = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    assert len(ours_p) == len(peft_p)
    grads = dict(zip(ours_p, torch.autograd.grad(y, list(ours_p.values()), g), strict=True))
    ref = dict(zip(peft_p, torch.autograd.grad(yp, list(peft_p.values()), g), strict=True))
    for name, gr in grads.items():
        mod, _, attr = name.rpartition(".")  # PEFT: lora_A.default.weight, or lora_embedding_A.default
        if isinstance(ours.get_submodule(mod), ftk.nn.LoRAEmbedding):
            key = f"base_model.model.{mod}.lora_embedding_{attr[-1]}.default"
        else:
            key = f"base_model.model.{mod}.{attr}.default.weight"
        torch.testing.assert_close(gr, ref[key], rtol=1e-9, atol=1e-10 * ref[key].abs().max().item())
    if kind == "bert":  # padding_idx's column of A gets no gradient, as in the base table
        assert grads["embeddings.word_embeddings.lora_A"][:, 0].abs().max() == 0


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_adapter_files_both_ways_and_from_peft(kind, tmp_path):
    base, ours, peft, layers, ids = _pair(kind)
    want = peft(input_ids=ids).last_hidden_state
    ftk.save_adapter(ours, str(tmp_path / "ours"))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, want, rtol=1e-10, atol=1e-12)
    peft.save_pretrained(str(tmp_path / "peft"))
    back = ftk.load_adapter(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert isinstance(back.embed_tokens, ftk.nn.LoRAEmbedding)
    torch.testing.assert_close(back(input_ids=ids).last_hidden_state, want, rtol=1e-10, atol=1e-12)
    fused = ftk.from_peft(copy.deepcopy(peft))
    assert isinstance(fused.embed_tokens, ftk.nn.LoRAEmbedding)
    torch.testing.assert_close(fused(input_ids=ids).last_hidden_state, want, rtol=1e-10, atol=1e-12)


def test_merge_unload_and_reset():
    base, ours, peft, layers, ids = _pair("gemma3")
    want = ours(input_ids=ids).last_hidden_state
    layer = ours.embed_tokens
    table = layer.base.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer.base.weight - table, layer.scaling * (layer.lora_B @ layer.lora_A).t().detach())
    torch.testing.assert_close(ours(input_ids=ids).last_hidden_state, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="merged"):
        layer.reset_parameters()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, table, rtol=1e-12, atol=1e-12)
    plain = ftk.unload_lora(copy.deepcopy(ours), merge=True)
    assert type(plain.embed_tokens).__name__ == "Gemma3TextScaledWordEmbedding"
    torch.testing.assert_close(plain(input_ids=ids).last_hidden_state, want, rtol=1e-10, atol=1e-12)
    layer.reset_parameters()  # PEFT's init: A zero, so the layer is its base again
    assert layer.lora_A.abs().max() == 0 and layer.lora_B.abs().max() > 0


def test_bf16_table_fp32_adapters_as_peft_and_training_step():
    base, ours, peft, layers, ids = _pair("llama", torch.bfloat16)
    layer = ours.embed_tokens
    assert layer.lora_A.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    y = ours.embed_tokens(ids)
    yp = peft.base_model.model.embed_tokens(ids)
    assert y.dtype == yp.dtype == torch.bfloat16
    torch.testing.assert_close(y, yp, rtol=0, atol=0)  # the same fp32 sum, rounded once
    opt = ftk.optim.FusedAdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    a0 = layer.lora_A.detach().clone()
    ours.train()
    ours(input_ids=ids).last_hidden_state.float().pow(2).mean().backward()
    opt.step()
    moved = (layer.lora_A - a0).abs().amax(0) > 0
    assert moved[ids.unique()].all() and not moved[[i for i in range(99) if i not in set(ids.flatten().tolist())]].any()


def test_bad_input_and_refusals():
    emb = nn.Embedding(10, 4)
    layer = ftk.nn.LoRAEmbedding(emb, r=2)
    with pytest.raises(TypeError, match="index tensor"):
        layer(torch.randn(3))
    with pytest.raises(TypeError, match="wraps an nn.Embedding"):
        ftk.nn.LoRAEmbedding(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="r must be a positive int"):
        ftk.nn.LoRAEmbedding(emb, r=0)
    x = torch.randint(0, 10, (2, 5))
    torch.testing.assert_close(layer(x), emb(x))  # B A = 0 at init (A zero)
    assert layer(x.int()).shape == (2, 5, 4)


def test_tied_table_adapts_lookups_only_and_refuses_to_merge():
    """GPT-2's LM head reads the embedding table (tie_word_embeddings). Unmerged, the adapter changes
    the lookups only, as PEFT's does (same logits). Merging would fold it into the LM head too (PEFT
    merges and its logits change by O(100) here): merge_lora / unload_lora(merge=True) refuse and
    change nothing; unload_lora(merge=False) gives the base model back."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=99)).double().eval()
    assert base.lm_head.weight is base.transformer.wte.weight
    ours = ftk.apply_lora(copy.deepcopy(base), ["wte", "c_attn"], r=4, alpha=8)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["wte", "c_attn"]))
    with torch.no_grad():
        for name, layer in ftk.peft_compat.lora_modules(ours).items():
            pl = peft.eval().base_model.model.get_submodule(name)
            if isinstance(layer, ftk.nn.LoRAEmbedding):
                pl.lora_embedding_A["default"].normal_()
                layer.lora_A.copy_(pl.lora_embedding_A["default"])
                layer.lora_B.copy_(pl.lora_embedding_B["default"])
    ids = torch.randint(0, 99, (2, 7))
    y = ours(input_ids=ids).logits
    torch.testing.assert_close(y, peft(input_ids=ids).logits, rtol=1e-10, atol=1e-10)
    table = base.transformer.wte.weight.clone()
    for fn in (ftk.merge_lora, lambda m: ftk.unload_lora(m, merge=True)):
        with pytest.raises(NotImplementedError, match=r"transformer.wte is tied to lm_head.weight"):
            fn(ours)
        assert not ours.transformer.wte.merged and not ours.transformer.h[0].attn.c_attn.merged
        torch.testing.assert_close(ours(input_ids=ids).logits, y, rtol=0, atol=0)
    plain = ftk.unload_lora(ours, merge=False)
    assert plain.lm_head.weight is plain.transformer.wte.weight
    torch.testing.assert_close(plain.transformer.wte.weight, table, rtol=0, atol=0)


@pytest.mark.parametrize("opts", [dict(max_norm=1.0), dict(scale_grad_by_freq=True), dict(sparse=True)], ids=str)
def test_embedding_options_of_the_base(opts):
    """The base's lookup options reach the adapter's lookup of A as in PEFT (outputs and gradients in
    float64 against the plain formula on the same weights); a ``sparse=True`` base (whose frozen table
    gets no gradient) gives A a dense gradient: a sparse one cannot be transposed back to A's
    ``[r, num]`` layout (PEFT's layer fails there; so did this one)."""
    torch.manual_seed(0)
    base = nn.Embedding(20, 8, padding_idx=2, **opts).double()
    layer = ftk.nn.LoRAEmbedding(copy.deepcopy(base), r=3, alpha=5)
    with torch.no_grad():
        layer.lora_A.normal_()
    x = torch.tensor([[0, 3, 3, 5], [7, 2, 1, 3]])
    a, b = (layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_())
    dense = dict(opts, sparse=False)
    want = base(x) + F.embedding(x, a.t(), padding_idx=2, **dense) @ b.t() * layer.scaling
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    got.backward(g)
    want.backward(g)
    assert layer.lora_A.grad.layout == torch.strided and layer.base.weight.grad is None
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-12, atol=1e-12)


def _dora_pair(kind):
    """(base, PEFT DoRA model with every adapter tensor off its init, its from_peft conversion, ids)."""
    torch.manual_seed(1)
    base, targets = MODELS[kind]()
    base = base.double().eval()
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    with torch.no_grad():
        for n, q in peft.named_parameters():
            if "magnitude" in n:
                q.mul_(1 + 0.2 * torch.randn_like(q))
            elif "lora_" in n:
                q.normal_(std=0.5)
    ours = ftk.from_peft(copy.deepcopy(peft)).eval()
    return base, peft.eval(), ours, torch.randint(1, 99, (3, 11))


def _peft_key(name: str, model) -> str:
    """Our trainable parameter name -> PEFT's."""
    mod, _, attr = name.rpartition(".")
    if attr == "lora_magnitude":
        return f"base_model.model.{mod}.lora_magnitude_vector.default.weight"
    if isinstance(model.get_submodule(mod), ftk.nn.LoRAEmbedding):
        return f"base_model.model.{mod}.lora_embedding_{attr[-1]}.default"
    return f"base_model.model.{mod}.{attr}.default.weight"


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_dora_matches_peft(kind):
    """DoRA on the embedding (PEFT's DoraEmbeddingVariant: m / ||column of W + s (A^T B^T)|| over the
    vocabulary, times the base output plus the adapter's, Gemma's embed_scale on the adapter's) next to
    DoRA Linears: outputs and the grads of A, B and the magnitudes, float64."""
    base, peft, ours, ids = _dora_pair(kind)
    emb = ours.get_input_embeddings()
    assert isinstance(emb, ftk.nn.LoRAEmbedding) and emb.dora and emb.lora_magnitude.shape == (32,)
    y, yp = ours(input_ids=ids).last_hidden_state, peft(input_ids=ids).last_hidden_state
    torch.testing.assert_close(y, yp, rtol=1e-10, atol=1e-12 * yp.abs().max().item())
    g = torch.randn_like(y)
    mine = {n: q for n, q in ours.named_parameters() if q.requires_grad}
    theirs = dict(peft.named_parameters())
    assert {_peft_key(n, ours) for n in mine} == {n for n, q in theirs.items() if q.requires_grad}
    got = torch.autograd.grad(y, list(mine.values()), g)
    want = torch.autograd.grad(yp, [theirs[_peft_key(n, ours)] for n in mine], g)
    for n, a, b in zip(mine, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10 * b.abs().max().item(), msg=n)


def test_dora_merge_files_and_apply_lora(tmp_path):
    """A DoRA embedding merges into PEFT's merged table (and back), its adapter file loads both ways, and
    apply_lora(use_dora=True) starts it as PEFT does (magnitude = the table's column norms, output = base)."""
    base, peft, ours, ids = _dora_pair("gemma3")
    want = ours(input_ids=ids).last_hidden_state
    ref = copy.deepcopy(peft).merge_and_unload()
    emb = ours.get_input_embeddings()
    table = emb.base.weight.clone()
    emb.merge()
    torch.testing.assert_close(emb.base.weight, ref.get_input_embeddings().weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(emb(ids), ref.get_input_embeddings()(ids))
    emb.unmerge()
    torch.testing.assert_close(emb.base.weight, table, rtol=1e-12, atol=1e-12)
    ftk.save_adapter(ours, str(tmp_path / "ours"))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, want, rtol=1e-10, atol=1e-12)
    peft.save_pretrained(str(tmp_path / "peft"))
    back = ftk.load_adapter(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert back.get_input_embeddings().dora
    torch.testing.assert_close(back(input_ids=ids).last_hidden_state, want, rtol=1e-10, atol=1e-12)
    fresh = ftk.apply_lora(copy.deepcopy(base), ["embed_tokens", "o_proj"], r=4, alpha=8, use_dora=True)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"], use_dora=True)
    start = get_peft_model(copy.deepcopy(base), cfg)
    m = fresh.get_input_embeddings().lora_magnitude
    torch.testing.assert_close(m, start.base_model.model.embed_tokens.lora_magnitude_vector["default"].weight)
    torch.testing.assert_close(fresh.get_input_embeddings()(ids), base.get_input_embeddings()(ids))
