"""apply_lora / from_peft / save_adapter / load_adapter / merge_lora on real model families, against
PEFT's get_peft_model with the same config and copied weights."""

import copy
import math

import pytest
import torch
from helpers.models import resnet18
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import ftkernels as ftk


def bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    return BertModel(cfg), dict(input_ids=torch.randint(0, 99, (2, 7)))


def gpt2():
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=99)
    return GPT2Model(cfg), dict(input_ids=torch.randint(0, 99, (2, 7)))


def llama():
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaModel(cfg), dict(input_ids=torch.randint(0, 99, (2, 7)))


def roberta():
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    return RobertaModel(cfg, add_pooling_layer=False), dict(input_ids=torch.randint(3, 99, (2, 7)))


def qwen2():
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, max_position_embeddings=32,
    )  # fmt: skip
    return Qwen2Model(cfg), dict(input_ids=torch.randint(0, 99, (2, 7)))


def vit():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=16, patch_size=4
    )
    return ViTModel(cfg, add_pooling_layer=False), dict(pixel_values=torch.randn(2, 3, 16, 16))


def falcon():  # FalconLinear (its own forward, same math) and in-place residual adds on LoRA outputs
    from transformers import FalconConfig, FalconModel

    cfg = FalconConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    return FalconModel(cfg), dict(input_ids=torch.randint(0, 99, (2, 7)))


def cnn():
    return resnet18(num_classes=5), dict(x=torch.randn(2, 3, 32, 32))


MODELS = {
    "bert": (bert, dict(target_modules=["query", "value"], modules_to_save=["pooler"])),
    "gpt2": (gpt2, dict(target_modules=["c_attn", "c_fc"])),
    "llama": (llama, dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "roberta": (roberta, dict(target_modules=r".*attention\.self\.(query|key|value)")),
    "qwen2": (qwen2, dict(target_modules=["q_proj", "k_proj", "v_proj"])),  # q/k/v carry biases
    "vit": (vit, dict(target_modules=["query", "value", "projection"])),  # patch embedding is a Conv2d
    "resnet18": (cnn, dict(target_modules=["conv1", "conv2"], modules_to_save=["fc"])),
    "gpt2-all-linear": (gpt2, dict(target_modules="all-linear")),  # every Conv1D
    "bert-bias-lora-only": (bert, dict(target_modules=["query", "key", "value"], bias="lora_only")),  # one group
    "qwen2-bias-all": (qwen2, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], bias="all")),
    "llama-all-linear": (llama, dict(target_modules="all-linear")),
    "falcon-all-linear": (falcon, dict(target_modules="all-linear")),
    # DoRA: Conv1D (fan_in_fan_out), q/k/v siblings (never grouped), Conv2d (ViT's patch embedding, ResNet)
    "gpt2-dora": (gpt2, dict(target_modules=["c_attn", "c_fc"], use_dora=True)),
    "bert-dora": (bert, dict(target_modules=["query", "key", "value"], modules_to_save=["pooler"], use_dora=True)),
    "vit-dora": (vit, dict(target_modules=["query", "value", "projection"], use_dora=True)),
    "resnet18-dora": (cnn, dict(target_modules=["conv1", "conv2"], modules_to_save=["fc"], use_dora=True)),
}


def _out(model, inputs):
    out = model(**inputs) if "x" not in inputs else model(inputs["x"])
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)  # BERT's pooler is a module to save: use it
    h = out.last_hidden_state.flatten()
    return h if pooled is None else torch.cat([h, pooled.flatten()])


def _pair(kind):
    torch.manual_seed(0)
    build, kw = MODELS[kind]
    base, inputs = build()
    base.eval()  # dropout in the HF models off; LoRA dropout is 0 here
    ours = ftk.apply_lora(copy.deepcopy(base), r=4, alpha=8, **kw)
    cfg = LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=kind.startswith("gpt2"), **kw)
    peft = get_peft_model(copy.deepcopy(base), cfg)
    peft.eval()
    layers = ftk.peft_compat.lora_modules(ours)
    with torch.no_grad():
        for name, layer in layers.items():
            pl = peft.base_model.model.get_submodule(name)
            pl.lora_B["default"].weight.normal_()
            layer.lora_A.copy_(pl.lora_A["default"].weight)
            layer.lora_B.copy_(pl.lora_B["default"].weight)
    return base, inputs, ours, peft, layers


def _peft_name(name, saved=("pooler", "fc")):
    """Our parameter name -> PEFT's (modules_to_save params live in PEFT's wrapper copy)."""
    for part in ("lora_A", "lora_B"):
        if name.endswith(part):
            return f"base_model.model.{name}.default.weight"
    if name.endswith(".lora_magnitude"):
        return f"base_model.model.{name.removesuffix('.lora_magnitude')}.lora_magnitude_vector.default.weight"
    mod = next((m for m in saved if name.startswith(m + ".")), None)
    if mod is None:  # a bias trained by bias="lora_only"/"all"
        return f"base_model.model.{name.replace('.base.', '.base_layer.')}"
    return f"base_model.model.{mod}.modules_to_save.default.{name[len(mod) + 1 :]}"


@pytest.mark.parametrize("kind", list(MODELS))
def test_apply_lora_matches_get_peft_model(kind):
    base, inputs, ours, peft, layers = _pair(kind)
    assert layers
    ours_train = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    peft_train = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    assert {_peft_name(n) for n in ours_train} == set(peft_train)
    assert sum(p.numel() for p in ours_train.values()) == sum(p.numel() for p in peft_train.values())
    y, yp = _out(ours, inputs), _out(peft, inputs)
    torch.testing.assert_close(y, yp, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, list(ours_train.values()), g)
    gp = torch.autograd.grad(yp, [peft_train[_peft_name(n)] for n in ours_train], g)
    for a, b in zip(ga, gp, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-4)


def _zoo(name):
    """Tiny configs of more Hugging Face architectures: (model, inputs)."""
    import transformers as T

    ids = torch.randint(0, 90, (2, 9))
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    pixels = dict(pixel_values=torch.randn(2, 3, 32, 32))
    seq2seq = dict(vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1, pad_token_id=0, eos_token_id=2)
    seq2seq.update(decoder_start_token_id=1)
    seq2seq.update(encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37)
    audio = dict(conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8)
    audio.update(num_conv_pos_embedding_groups=4, bos_token_id=1)
    zoo = {
        "t5": lambda: (
            T.T5Model(T.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)),
            dict(input_ids=ids, decoder_input_ids=ids[:, :4]),
        ),
        "distilbert": lambda: (
            T.DistilBertModel(T.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=2, hidden_dim=37)),
            dict(input_ids=ids),
        ),
        "mistral": lambda: (T.MistralModel(T.MistralConfig(num_key_value_heads=2, **text)), dict(input_ids=ids)),
        "gemma": lambda: (T.GemmaModel(T.GemmaConfig(num_key_value_heads=1, head_dim=8, **text)), dict(input_ids=ids)),
        "opt": lambda: (
            T.OPTModel(
                T.OPTConfig(
                    vocab_size=99,
                    hidden_size=32,
                    ffn_dim=48,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    word_embed_proj_dim=32,
                )
            ),
            dict(input_ids=ids),
        ),  # fmt: skip
        "bloom": lambda: (
            T.BloomModel(T.BloomConfig(vocab_size=99, hidden_size=32, n_layer=2, n_head=4)),
            dict(input_ids=ids),
        ),  # fmt: skip
        "gpt_neox": lambda: (T.GPTNeoXModel(T.GPTNeoXConfig(**text)), dict(input_ids=ids)),
        "deberta_v2": lambda: (T.DebertaV2Model(T.DebertaV2Config(**text)), dict(input_ids=ids)),
        "swin": lambda: (
            T.SwinModel(
                T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
            ),
            pixels,
        ),  # fmt: skip
        "convnext": lambda: (
            T.ConvNextModel(T.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)),
            pixels,
        ),
        "albert": lambda: (  # one layer's modules called for every layer: each LoRA layer runs 3 times
            T.AlbertModel(T.AlbertConfig(**{**text, "embedding_size": 16, "num_hidden_layers": 3})),
            dict(input_ids=ids),
        ),
        "whisper": lambda: (
            T.WhisperModel(T.WhisperConfig(**seq2seq, num_mel_bins=8, max_source_positions=16, bos_token_id=1)),
            dict(input_features=torch.randn(2, 8, 32), decoder_input_ids=ids[:, :5]),
        ),
        "wav2vec2": lambda: (
            T.Wav2Vec2Model(T.Wav2Vec2Config(**{**text, **audio})),
            dict(input_values=torch.randn(2, 400)),
        ),
    }
    return zoo[name]()


ZOO = ["t5", "distilbert", "mistral", "gemma", "opt", "bloom", "gpt_neox", "deberta_v2", "swin", "convnext", "albert"]
ZOO += ["whisper", "wav2vec2"]


@pytest.mark.parametrize("name", ZOO)
def test_all_linear_zoo_matches_peft(name):
    """More architectures under ``"all-linear"``: the same layers as PEFT's, the same outputs and the
    same adapter grads (eval mode). Among them: T5's bias-free layers and in-place ops, BLOOM's fused
    qkv, ConvNeXt's Linear pointwise convs on NHWC activations, Swin's windows."""
    torch.manual_seed(0)
    base, inputs = _zoo(name)
    base.eval()
    ours = ftk.apply_lora(copy.deepcopy(base), "all-linear", r=4, alpha=8)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).eval()
    layers = ftk.peft_compat.lora_modules(ours)
    theirs = {n.removeprefix("base_model.model."): m for n, m in peft.named_modules() if hasattr(m, "base_layer")}
    assert set(layers) == set(theirs)
    with torch.no_grad():
        for n, layer in layers.items():
            theirs[n].lora_B["default"].weight.normal_(std=0.1)
            layer.lora_A.copy_(theirs[n].lora_A["default"].weight)
            layer.lora_B.copy_(theirs[n].lora_B["default"].weight)
    y, yp = ours(**inputs).last_hidden_state, peft(**inputs).last_hidden_state
    torch.testing.assert_close(y, yp, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [m.lora_A for m in layers.values()], g, allow_unused=True)
    ref = torch.autograd.grad(yp, [theirs[n].lora_A["default"].weight for n in layers], g, allow_unused=True)
    assert sum(b is not None for b in ref) >= len(ref) - 1  # ALBERT's pooler does not reach last_hidden_state
    for a, b in zip(grads, ref, strict=True):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-4)


def _conv_zoo(name):
    """Tiny Hugging Face vision models with many kinds of Conv2d: depthwise and grouped (skipped where
    r is no multiple of groups, as PEFT requires), strided 1x1 projections, convs inside attention
    (CvT's dw_bn projections, MobileViT), pooling mixers and conv patch embeddings."""
    import transformers as T

    zoo = {
        "efficientnet": lambda: T.EfficientNetModel(
            T.EfficientNetConfig(width_coefficient=0.25, depth_coefficient=0.2, image_size=32, hidden_dim=320)
        ),
        "mobilevit": lambda: T.MobileViTModel(
            T.MobileViTConfig(image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32])
        ),
        "cvt": lambda: T.CvtModel(
            T.CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 2, 3], drop_path_rate=[0.0] * 3)
        ),
        "poolformer": lambda: T.PoolFormerModel(
            T.PoolFormerConfig(
                num_encoder_blocks=2,
                depths=[1, 1],
                hidden_sizes=[8, 16],
                patch_sizes=[7, 3],
                strides=[4, 2],
                padding=[2, 1],
            )
        ),  # fmt: skip
        "regnet": lambda: T.RegNetModel(
            T.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4)
        ),
    }
    return zoo[name]()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", ["efficientnet", "mobilevit", "cvt", "poolformer", "regnet"])
def test_conv_zoo_matches_peft(name, channels_last):
    """LoRA on every Conv2d PEFT accepts (r=4: groups 1, 2 or 4), float64 against PEFT: the same
    layers, every hidden state and every adapter grad (eval mode)."""
    torch.manual_seed(0)
    base = _conv_zoo(name).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    if channels_last:
        base, x = base.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    names = [n for n, m in base.named_modules() if type(m) is nn.Conv2d and 4 % m.groups == 0]
    ours = ftk.apply_lora(copy.deepcopy(base), names, r=4, alpha=8)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=names)).eval()
    layers = ftk.peft_compat.lora_modules(ours)
    theirs = {n.removeprefix("base_model.model."): m for n, m in peft.named_modules() if hasattr(m, "base_layer")}
    assert set(layers) == set(theirs) == set(names)
    with torch.no_grad():
        for n, layer in layers.items():
            theirs[n].lora_B["default"].weight.normal_(std=0.1)
            layer.lora_A.copy_(theirs[n].lora_A["default"].weight)
            layer.lora_B.copy_(theirs[n].lora_B["default"].weight)

    def hidden(model):
        out = model(pixel_values=x, output_hidden_states=True)
        return torch.cat([h.flatten() for h in (*out.hidden_states, out.last_hidden_state)])

    y, yp = hidden(ours), hidden(peft)
    assert (yp - hidden(base)).abs().max() > 1e-3 * yp.abs().max()  # the adapters count
    torch.testing.assert_close(y, yp, rtol=1e-10, atol=1e-12 * yp.abs().max().item())
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, [p for m in layers.values() for p in (m.lora_A, m.lora_B)], g, allow_unused=True)
    w = [p for n in layers for p in (theirs[n].lora_A["default"].weight, theirs[n].lora_B["default"].weight)]
    gp = torch.autograd.grad(yp, w, g, allow_unused=True)
    assert sum(a is not None for a in ga) > len(layers)
    for a, b in zip(ga, gp, strict=True):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10 * b.abs().max().item())


def test_all_linear_leaves_out_the_output_layer_and_modules_to_save():
    """``"all-linear"`` picks what PEFT's shorthand picks on models with heads: not ``lm_head`` (the
    output embeddings), and not a head trained in full (PEFT leaves a SEQ_CLS classifier out)."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    def names(model):
        return sorted(n.removeprefix("base_model.model.") for n in ftk.peft_compat.lora_modules(model))

    def peft_names(model, **kw):
        pm = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", **kw))
        return sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "base_layer"))

    torch.manual_seed(0)
    lm = lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=99))  # noqa: E731
    ours = names(ftk.apply_lora(lm(), "all-linear", r=2))
    assert len(ours) == 8 and "lm_head" not in ours and ours == peft_names(lm())
    cls = lambda: BertForSequenceClassification(  # noqa: E731
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    )
    model = ftk.apply_lora(cls(), "ALL-LINEAR", r=2, modules_to_save=["classifier"])
    ours = names(model)
    theirs = [n for n in peft_names(cls(), task_type="SEQ_CLS") if "modules_to_save" not in n]
    assert "classifier" not in ours and ours == theirs
    assert all(p.requires_grad for p in model.classifier.parameters())
    with pytest.raises(ValueError, match="matches target_modules='all-linear'"):
        ftk.apply_lora(nn.Sequential(nn.Conv2d(3, 4, 3)), "all-linear")


@pytest.mark.parametrize("kind", ["bert", "gpt2", "resnet18", "gpt2-dora", "resnet18-dora"])
def test_save_adapter_loads_in_peft_and_back(kind, tmp_path):
    base, inputs, ours, peft, _ = _pair(kind)
    want = _out(ours, inputs)
    ftk.save_adapter(ours, str(tmp_path / "ours"))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_out(loaded, inputs), want, atol=1e-5, rtol=1e-5)
    peft.save_pretrained(str(tmp_path / "peft"))
    mine = ftk.load_adapter(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_out(mine, inputs), _out(peft, inputs), atol=1e-5, rtol=1e-5)


def test_from_peft_identical_outputs_and_merge():
    base, inputs, _, peft, _ = _pair("llama")
    want = _out(peft, inputs)
    fused = ftk.from_peft(peft)
    assert not any("lora_A.default" in n for n, _ in fused.named_parameters())
    assert all(isinstance(m, ftk.nn.LoRALinear) for m in ftk.peft_compat.lora_modules(fused).values())
    torch.testing.assert_close(_out(fused, inputs), want)
    ftk.merge_lora(fused)
    torch.testing.assert_close(_out(fused, inputs), want, atol=1e-5, rtol=1e-5)
    ftk.unmerge_lora(fused)
    torch.testing.assert_close(_out(fused, inputs), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "resnet18", "gpt2-dora", "resnet18-dora"])
def test_unload_lora_gives_the_plain_model(kind):
    """``unload_lora``: PEFT's merge_and_unload (same outputs, the same merged weights as PEFT's) and
    unload (the original weights back); either way the plain architecture's state dict keys, so the
    base class loads it strictly."""
    base, inputs, ours, peft, _ = _pair(kind)
    want = _out(ours, inputs)
    merged = copy.deepcopy(ours)
    ftk.merge_lora(merged)  # an already merged layer unloads as it is
    merged = ftk.unload_lora(merged)
    assert not ftk.peft_compat.lora_modules(merged)
    torch.testing.assert_close(_out(merged, inputs), want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)
    ref = peft.merge_and_unload()
    assert set(merged.state_dict()) == set(base.state_dict()) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, atol=1e-6, rtol=1e-6)
    copy.deepcopy(base).load_state_dict(merged.state_dict(), strict=True)
    dropped = ftk.unload_lora(ours, merge=False)
    for k, v in base.state_dict().items():
        assert torch.equal(dropped.state_dict()[k], v), k
    with pytest.raises(ValueError, match="no fused LoRA layer"):
        ftk.unload_lora(dropped)


def test_multihead_attention_out_proj_is_not_a_silent_target():
    """nn.MultiheadAttention reads ``out_proj.weight`` instead of calling out_proj, so LoRA there would
    never run (its grads stay None): an explicit target raises, ``"all-linear"`` leaves it out."""

    def model():
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)

    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention"):
        ftk.apply_lora(model(), ["out_proj", "linear1"], r=2)
    m = ftk.apply_lora(model(), "all-linear", r=2)
    assert list(ftk.peft_compat.lora_modules(m)) == ["layers.0.linear1", "layers.0.linear2"]
    with torch.no_grad():
        for layer in ftk.peft_compat.lora_modules(m).values():
            layer.lora_B.normal_()
    m(torch.randn(2, 5, 16)).sum().backward()
    assert all(layer.lora_A.grad is not None for layer in ftk.peft_compat.lora_modules(m).values())


def test_apply_lora_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="matches"):
        ftk.apply_lora(model, ["nothing"])
    with pytest.raises(TypeError, match="LayerNorm"):
        ftk.apply_lora(model, ["2"], r=2)
    with pytest.raises(ValueError, match="modules_to_save"):
        ftk.apply_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2, modules_to_save=["head"])


def test_apply_lora_failing_leaves_the_model_and_a_second_call_adds_layers(tmp_path):
    """An unsupported match raises before anything changes (no layer swapped, no flag flipped); a second
    call adds LoRA layers and keeps training the first call's modules_to_save (and saves them)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(3, 3, 3, groups=3), nn.Linear(4, 2))
    before = [(type(m), p.requires_grad) for m in model for p in m.parameters()]
    with pytest.raises(ValueError, match="groups=3"):
        ftk.apply_lora(model, ["0", "1"], r=2)
    assert [(type(m), p.requires_grad) for m in model for p in m.parameters()] == before

    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 2))
    ftk.apply_lora(model, ["0"], r=2, modules_to_save=["2"])
    ftk.apply_lora(model, ["1"], r=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B", "1.lora_A", "1.lora_B", "2.weight", "2.bias"}
    ftk.save_adapter(model, tmp_path)
    fresh = ftk.load_adapter(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 2)), tmp_path)
    assert [fresh[0].r, fresh[1].r] == [2, 3]
    loaded = dict(fresh.named_parameters())
    for n in trainable:  # adapters of both calls and the saved head: what the file carries
        assert torch.equal(loaded[n], model.get_parameter(n)) and loaded[n].requires_grad, n


def test_regex_targets_and_compile_without_graph_breaks():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    ftk.apply_lora(model, r"[02]", r=2, alpha=4, dropout=0.1)
    assert len(ftk.peft_compat.lora_modules(model)) == 2
    explain = torch._dynamo.explain(model)(torch.randn(3, 8))
    assert explain.graph_break_count == 0
    model.eval()
    x = torch.randn(5, 8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


def test_from_peft_with_two_adapters_warns_and_keeps_the_active_one():
    base, inputs, _, peft, _ = _pair("bert")
    peft.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    want = _out(peft, inputs)  # "default" stays active
    with pytest.warns(UserWarning, match="other"):
        fused = ftk.from_peft(peft)
    torch.testing.assert_close(_out(fused, inputs), want)


def test_load_adapter_checks_shapes_before_writing(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    src = ftk.apply_lora(copy.deepcopy(base), ["0", "1"], r=2)
    with torch.no_grad():
        for p in src.parameters():
            if p.requires_grad:
                p.normal_()
    ftk.save_adapter(src, tmp_path)
    x = torch.randn(4, 6)

    # Other base sizes: refused, and the model is left as it was (rank and tensors untouched).
    other = ftk.apply_lora(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)), ["0", "1"], r=3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"1\.lora_B\.weight has shape \(3, 2\) in the adapter, the model needs \(4, 2\)"
    ):
        ftk.load_adapter(other, tmp_path)
    assert [m.r for m in (other[0], other[1])] == [3, 3]
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())

    # Another rank only: adopted from the config, with a warning (the tensors are new Parameters).
    ranked = ftk.apply_lora(copy.deepcopy(base), ["0", "1"], r=3)
    with pytest.warns(UserWarning, match="build the optimizer after loading"):
        ftk.load_adapter(ranked, tmp_path)
    assert ranked[0].r == 2 and ranked[0].scaling == src[0].scaling
    torch.testing.assert_close(ranked(x), src(x), rtol=0, atol=0)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_option_trains_and_saves_what_peft_does(bias, tmp_path):
    """PEFT's ``bias``: the same params train as under get_peft_model, the biases travel in the adapter
    file under PEFT's key names (``<layer>.base_layer.bias``) both ways, and from_peft keeps them
    trainable."""
    base, inputs = bert()
    kw = dict(r=4, alpha=8, bias=bias)
    ours = ftk.apply_lora(copy.deepcopy(base), ["query", "value"], **kw)
    peft = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], bias=bias)
    )

    def peft_names(model):
        return {
            n.removeprefix("base_model.model.").replace(".default", "")
            for n, p in model.named_parameters()
            if p.requires_grad
        }

    ours_names = {ftk.peft_compat.peft_param_name(ours, n) for n, p in ours.named_parameters() if p.requires_grad}
    ours_names = {n + ".weight" if n.endswith(("lora_A", "lora_B")) else n for n in ours_names}
    assert ours_names == peft_names(peft) and any(n.endswith("query.base_layer.bias") for n in ours_names)

    with torch.no_grad():  # train-like changes: adapters and biases away from their initial values
        for p in list(ours.parameters()) + list(peft.parameters()):
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ftk.save_adapter(ours, str(tmp_path / "ours"))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_out(loaded, inputs), _out(ours.eval(), inputs), atol=1e-5, rtol=1e-5)
    peft.save_pretrained(str(tmp_path / "peft"))
    mine = ftk.load_adapter(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_out(mine, inputs), _out(peft.eval(), inputs), atol=1e-5, rtol=1e-5)
    assert {n for n, p in mine.named_parameters() if p.requires_grad} == {
        n for n, p in ours.named_parameters() if p.requires_grad
    }
    fused = ftk.from_peft(peft)
    assert {n for n, p in fused.named_parameters() if p.requires_grad} == {
        n for n, p in ours.named_parameters() if p.requires_grad
    }
    with pytest.raises(ValueError, match="bias must be one of"):
        ftk.apply_lora(copy.deepcopy(base), ["query"], bias="some")


def test_load_adapter_takes_the_layers_the_file_holds(tmp_path):
    """A PEFT adapter narrowed by ``layers_to_transform`` / ``exclude_modules`` loads onto exactly its
    layers (the file's keys say which), not onto every match of ``target_modules``."""
    base, inputs = bert()
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], layers_to_transform=[1], exclude_modules=["value"]
    )
    peft = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_()
    peft.save_pretrained(str(tmp_path))
    mine = ftk.load_adapter(copy.deepcopy(base), str(tmp_path)).eval()
    assert list(ftk.peft_compat.lora_modules(mine)) == ["encoder.layer.1.attention.self.query"]
    torch.testing.assert_close(_out(mine, inputs), _out(peft.eval(), inputs), atol=1e-5, rtol=1e-5)


def test_from_peft_refuses_unsupported_layers_before_changing_anything():
    """A PEFT layer the fused layers refuse (here a merged lora.MultiheadAttention): a clear error, and
    the PEFT model untouched (the Linear before it is not converted either)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.mha = nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            h = self.lin(x)
            return self.mha(h, h, h)[0]

    peft = get_peft_model(Net(), LoraConfig(r=2, target_modules=["lin", "mha"]))
    peft.base_model.model.mha.merge()
    before = [type(m) for m in peft.modules()]
    flags = [p.requires_grad for p in peft.parameters()]
    with pytest.raises(NotImplementedError, match=r"MultiheadAttention adapter is merged"):
        ftk.from_peft(peft)
    assert [type(m) for m in peft.modules()] == before
    assert [p.requires_grad for p in peft.parameters()] == flags


def test_meta_device_init_then_reset_parameters():
    """Build on the meta device, apply LoRA, materialize with to_empty, then every module's
    reset_parameters (FSDP's meta-init recipe): the adapters get PEFT's init (B = 0, A Kaiming) and the
    model equals its base once the base weights are loaded."""
    torch.manual_seed(0)

    def build():
        return nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)
        )

    twin = build()
    with torch.device("meta"):
        model = build()
    ftk.apply_lora(model, ["0", "2", "4"], r=4)
    assert model[4].lora_A.is_meta
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    for i in (0, 2, 4):
        assert torch.count_nonzero(model[i].lora_B) == 0
        a = model[i].lora_A
        bound = 1 / math.sqrt(a[0].numel())  # kaiming_uniform(a=sqrt(5)) on [r, fan_in]
        assert a.abs().max() <= bound and a.std() > bound / 4
        model[i].base.load_state_dict(twin[i].state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), twin(x))
    model[4].merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        model[4].reset_parameters()


def test_merge_into_weight_normed_bases():
    """A weight-normed base (``parametrizations.weight_norm``: EnCodec's and wav2vec2's convs) computes
    its weight from g and v, so a merge must go through the parametrization (a copy into the computed
    weight would be lost): merge, unmerge and unload keep the outputs, DoRA included. Other
    parametrizations (spectral_norm) cannot store a merged weight: refused, nothing changed."""
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(
        weight_norm(nn.Linear(6, 8)), nn.Unflatten(1, (2, 4)), weight_norm(nn.Conv1d(2, 3, 3)), nn.Flatten(),
        weight_norm(Conv1D(5, 6)),
    ).double()  # fmt: skip
    x = torch.randn(3, 6, dtype=torch.float64)
    for dora in (False, True):
        ours = ftk.apply_lora(copy.deepcopy(model), ["0", "2", "4"], r=2, use_dora=dora)
        for layer in ftk.peft_compat.lora_modules(ours).values():
            with torch.no_grad():
                layer.lora_B.normal_()
        want = ours(x)
        ftk.merge_lora(ours)
        assert all(layer.merged for layer in ftk.peft_compat.lora_modules(ours).values())
        torch.testing.assert_close(ours(x), want)
        ftk.unmerge_lora(ours)
        torch.testing.assert_close(ours(x), want)
        torch.testing.assert_close(ours[0].base.weight, model[0].weight)
        plain = ftk.unload_lora(ours, merge=True)
        assert parametrize_kinds(plain[2]) == ["_WeightNorm"]
        torch.testing.assert_close(plain(x), want)
    sn = nn.Sequential(spectral_norm(nn.Linear(6, 4)), nn.Linear(4, 4)).double().eval()
    ours = ftk.apply_lora(sn, ["0", "1"], r=2)
    w1 = ours[1].base.weight.detach().clone()
    for fn in (ftk.merge_lora, lambda m: ftk.unload_lora(m, merge=True)):
        with pytest.raises(NotImplementedError, match=r"0: its base weight is parametrized \(_SpectralNorm\)"):
            fn(ours)
        assert not ours[1].merged and torch.equal(ours[1].base.weight, w1)
    with pytest.raises(NotImplementedError, match="cannot store a merged weight"):
        ours[0].merge()


def parametrize_kinds(module):
    return [type(q).__name__ for q in module.parametrizations.weight]


def test_from_peft_leaves_the_global_rng_stream_alone():
    """Converting a PEFT model (Linear, Conv2d, Conv1d and Embedding layers) draws nothing from the
    global RNG: a seeded run's later draws (dropout masks, data order) are the same with or without it."""
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6), nn.Unflatten(2, (2, 3)), nn.Conv2d(4, 4, 1))
    model.add_module("c1", nn.Conv1d(4, 4, 3))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["0", "1", "3", "c1"]))
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    ours = ftk.from_peft(copy.deepcopy(peft))
    assert torch.equal(torch.rand(4), want)
    kinds = {type(m).__name__ for m in ftk.peft_compat.lora_modules(ours).values()}
    assert kinds == {"LoRAEmbedding", "LoRALinear", "LoRAConv2d", "LoRAConv1d"}


def test_new_layers_keep_the_model_mode_and_the_model_pickles():
    """A model put in eval before apply_lora stays in eval (its new LoRA layers too: no dropout), from_peft
    keeps each PEFT layer's mode; torch.save / torch.load of the whole model (grouped q/k/v included),
    deepcopy and a state_dict into a fresh apply_lora model give the same outputs."""
    import io

    torch.manual_seed(0)
    model, inputs = bert()
    model.eval()
    ftk.apply_lora(model, ["query", "key", "value", "dense"], r=4, dropout=0.3)
    layers = ftk.peft_compat.lora_modules(model)
    assert layers and not any(layer.training for layer in layers.values())
    for layer in layers.values():
        with torch.no_grad():
            layer.lora_B.normal_()
    want = _out(model, inputs)
    torch.testing.assert_close(_out(model, inputs), want, rtol=0, atol=0)  # no dropout
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    fresh = ftk.apply_lora(bert()[0].eval(), ["query", "key", "value", "dense"], r=4)
    fresh.load_state_dict(model.state_dict())
    for other in (loaded, copy.deepcopy(model), fresh):
        torch.testing.assert_close(_out(other, inputs), want, rtol=0, atol=0)
    peft = get_peft_model(bert()[0], LoraConfig(r=2, lora_dropout=0.3, target_modules=["query"]))
    peft.base_model.model.encoder.layer[0].attention.self.query.eval()
    ours = ftk.from_peft(peft)
    assert not ours.encoder.layer[0].attention.self.query.training
    assert ours.encoder.layer[1].attention.self.query.training


def test_load_adapter_matches_rank_and_alpha_patterns_as_peft_does(tmp_path):
    """PEFT reads a rank_pattern / alpha_pattern key as a regex for a module name's tail after a dot
    (first matching key wins): ``[01]\\.q`` names body.0.q and body.1.q, not body.2.q."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.v(torch.tanh(self.q(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(*[Block() for _ in range(3)])

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    base = Net().double()
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False,
        rank_pattern={r"[01]\.q": 2, "q": 3}, alpha_pattern={r"body\.2\.v": 3, "v": 5},
    )  # fmt: skip
    peft = get_peft_model(copy.deepcopy(base), cfg)
    peft.save_pretrained(tmp_path)
    ours = ftk.load_adapter(copy.deepcopy(base), str(tmp_path))
    for name, layer in ftk.peft_compat.lora_modules(ours).items():
        theirs = peft.base_model.model.get_submodule(name)
        assert (layer.r, layer.alpha) == (theirs.r["default"], theirs.lora_alpha["default"]), name
    assert [ours.body[i].q.r for i in range(3)] == [2, 2, 3]
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(ours(x), peft(x), rtol=0, atol=1e-12)


def test_apply_lora_on_a_lazy_module_asks_for_a_forward_first():
    """Uninitialized lazy parameters: refused with the way out named (PEFT builds zero-width adapters);
    after one forward the same call works and trains."""
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"0\.weight is an uninitialized parameter .* run one forward"):
        ftk.apply_lora(model, ["0"], r=2)
    assert type(model[0]) is nn.LazyLinear
    x = torch.randn(3, 5)
    model(x)
    ftk.apply_lora(model, ["0"], r=2)
    model(x).sum().backward()
    assert model[0].lora_B.grad is not None and model[0].lora_A.shape == (2, 5)


def _llama_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).double().eval()


def _trained(peft_model):
    """B (and every other trainable tensor) moved off its init, so a dropped term would show."""
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return peft_model


@pytest.mark.parametrize(
    "make, error, match",
    [
        # aLoRA applies the adapter only after the invocation tokens (offsets PeftModel computes per
        # batch); a plain fused layer would apply it everywhere: 0.5 off before this check.
        (
            lambda: LoraConfig(r=2, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6]),
            NotImplementedError,
            r"ALoraLinearVariant .*plain LoRA and DoRA only",
        ),
        # AdaLoRA's layers are LoraLayers: before this check they failed with an AttributeError.
        (
            lambda: __import__("peft").AdaLoraConfig(r=2, target_modules=["q_proj"], total_step=10),
            NotImplementedError,
            r"AdaLoRA SVDLinear",
        ),
        (
            lambda: __import__("peft").IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
            ValueError,
            r"no PEFT LoRA layer \(its PEFT adapters are IA3; only LoRA converts\)",
        ),
    ],
    ids=["alora", "adalora", "ia3"],
)
def test_from_peft_refuses_what_is_not_plain_lora_and_leaves_the_model(make, error, match):
    """PEFT adapters whose forward is not plain LoRA (aLoRA, AdaLoRA, other tuners): a clear
    error naming what, and the PEFT model untouched (same modules, same outputs)."""
    torch.manual_seed(0)
    peft = _trained(get_peft_model(_llama_lm(), make())).eval()
    ids = torch.randint(0, 99, (2, 9))
    ids[:, 3:5] = torch.tensor([5, 6])  # aLoRA's invocation sequence, so its adapter is live after it
    before, ref = [type(m) for m in peft.modules()], peft(input_ids=ids).logits
    with pytest.raises(error, match=match):
        ftk.from_peft(peft)
    assert [type(m) for m in peft.modules()] == before
    torch.testing.assert_close(peft(input_ids=ids).logits, ref, rtol=0, atol=0)


def test_from_peft_converts_mica_with_b_frozen():
    """PEFT's MiCA (init_lora_weights="mica") is plain LoRA with B frozen: converted, same outputs,
    the same tensors train (A only)."""
    torch.manual_seed(0)
    peft = get_peft_model(
        _llama_lm().float(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="mica")
    )
    _trained(peft).eval()
    ids = torch.randint(0, 99, (2, 9))
    ref = peft(input_ids=ids).logits
    want = sorted(
        n.replace("base_model.model.", "").replace(".default.weight", "")
        for n, p in peft.named_parameters()
        if p.requires_grad
    )
    model = ftk.from_peft(peft)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)
    trains = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trains == want and trains and all(n.endswith("lora_A") for n in trains)


def test_load_adapter_refuses_lora_variants(tmp_path):
    """An adapter file of a LoRA variant (here aLoRA) is refused before the model changes; the list of
    variant keys covers every variant PEFT's LoraConfig declares (DoRA aside, which loads)."""
    import dataclasses

    from ftkernels.peft_compat import _VARIANT_KEYS

    declared = {f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant")}
    assert declared - {"use_dora"} <= set(_VARIANT_KEYS), "PEFT declares a LoRA variant load_adapter does not check"
    torch.manual_seed(0)
    cfg = LoraConfig(r=2, target_modules=["q_proj"], alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM")
    get_peft_model(_llama_lm(), cfg).save_pretrained(tmp_path)
    model = _llama_lm()
    before = [type(m) for m in model.modules()]
    with pytest.raises(NotImplementedError, match=r"LoRA variant \(alora_invocation_tokens\)"):
        ftk.load_adapter(model, str(tmp_path))
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("as_dict", [False, True], ids=["list", "dict"])
def test_trainable_tokens_are_saved_loaded_and_unloaded(tied, as_dict, tmp_path):
    """PEFT's ``trainable_token_indices`` (new values for some embedding rows; with tied embeddings the
    lm_head shares them): ``from_peft`` keeps them, ``save_adapter`` writes them (before the fix they
    were dropped: 0.75 off after reloading), PEFT and ``load_adapter`` read them back to the same outputs
    and the same trainable tensors, and ``unload_lora`` merges them in (or drops them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, max_position_embeddings=32, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).double().eval()
    idx = [3, 5, 40]
    tti = {"embed_tokens": idx} if as_dict else idx
    peft = _trained(
        get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=tti))
    )
    ids = torch.tensor([[3, 5, 7, 40, 1, 3]])
    ref = peft.eval()(input_ids=ids).logits
    assert (ref - base(input_ids=ids).logits).abs().max() > 1e-2  # the tokens change the outputs

    def trains(m):
        return sorted(tuple(p.shape) for p in m.parameters() if p.requires_grad)

    want = trains(peft)
    peft.save_pretrained(str(tmp_path / "peft"))  # (from_peft converts the PEFT model in place)
    model = ftk.from_peft(peft)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)
    ftk.save_adapter(model, str(tmp_path / "ours"))
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"), is_trainable=True)
    torch.testing.assert_close(back.eval()(input_ids=ids).logits, ref, rtol=0, atol=1e-12)
    loaded = ftk.load_adapter(copy.deepcopy(base), str(tmp_path / "peft"))
    torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=0, atol=1e-12)
    assert trains(loaded) == want == trains(back)
    merged = ftk.unload_lora(loaded, merge=True)
    assert not ftk.peft_compat._token_wrappers(merged) and type(merged.model.embed_tokens) is nn.Embedding
    torch.testing.assert_close(merged(input_ids=ids).logits, ref, rtol=0, atol=1e-12)
    dropped = ftk.unload_lora(ftk.load_adapter(copy.deepcopy(base), str(tmp_path / "peft")), merge=False)
    torch.testing.assert_close(dropped(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)


def test_load_adapter_refuses_other_trainable_tokens(tmp_path):
    """A model already holding trainable tokens for other rows than the adapter's: an error, not a
    load into the wrong rows."""
    torch.manual_seed(0)
    get_peft_model(
        _llama_lm(), LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5])
    ).save_pretrained(tmp_path / "a")
    other = ftk.from_peft(
        get_peft_model(_llama_lm(), LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[4, 5]))
    )
    with pytest.raises(ValueError, match=r"trainable tokens \{'model.embed_tokens': \[4, 5\]\} are not the adapter's"):
        ftk.load_adapter(other, str(tmp_path / "a"))


def test_merging_a_tied_lm_head_is_refused():
    """LoRA on an lm_head tied to the input embedding (tie_word_embeddings): merging would write the
    adapter into the shared tensor and change the embedding too (112 off before; PEFT merges with a
    warning, 44 off). merge_lora / unload_lora(merge=True) raise with nothing changed; the unmerged
    model and unload_lora(merge=False) are fine."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ftk.apply_lora(LlamaForCausalLM(cfg).double().eval(), ["lm_head", "q_proj"], r=2)
    assert model.lm_head.base.weight is model.model.embed_tokens.weight
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):
            nn.init.normal_(p.data)
    ids = torch.randint(0, 99, (2, 7))
    ref = model(input_ids=ids).logits
    table = model.model.embed_tokens.weight.detach().clone()
    for call in (ftk.merge_lora, lambda m: ftk.unload_lora(m, merge=True)):
        with pytest.raises(NotImplementedError, match=r"weight of lm_head is tied to model.embed_tokens.weight"):
            call(model)
        assert not any(m.merged for m in ftk.peft_compat.lora_modules(model).values())
        assert torch.equal(model.model.embed_tokens.weight, table)
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)
    plain = ftk.unload_lora(model, merge=False)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight


@pytest.mark.parametrize("saved", [["lm_head"], ["embed_tokens", "lm_head"]], ids=["lm_head", "both"])
def test_modules_to_save_on_tied_weights_train_a_copy_as_peft(saved, tmp_path):
    """modules_to_save on a module tied to another (tie_word_embeddings): PEFT trains a copy of each saved
    module. Here the saved module trained the shared tensor in place, so the embedding moved too and
    the adapter file gave another model under PEFT (4.0 off), and ftk.load_adapter refused its own file.
    Now: a copy (with a warning), the same training step as PEFT's, files both ways."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).double().eval()
    with pytest.warns(UserWarning, match=r"trains its own copy, and the model is untied"):
        ours = ftk.apply_lora(copy.deepcopy(base), ["q_proj"], r=2, modules_to_save=saved)
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight and not ours.config.tie_word_embeddings
    peft = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj"], modules_to_save=saved)
    )
    with torch.no_grad():  # the same adapters on both
        for name, layer in ftk.peft_compat.lora_modules(ours).items():
            pl = peft.base_model.model.get_submodule(name)
            layer.lora_A.copy_(pl.lora_A["default"].weight)
            pl.lora_B["default"].weight.normal_()
            layer.lora_B.copy_(pl.lora_B["default"].weight)
    ids = torch.randint(0, 99, (2, 7))
    for model in (ours, peft):  # one SGD step on the same batch
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    ref = peft(input_ids=ids).logits
    torch.testing.assert_close(ours(input_ids=ids).logits, ref, rtol=1e-10, atol=1e-10)
    ftk.save_adapter(ours, str(tmp_path))
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(back(input_ids=ids).logits, ref, rtol=1e-10, atol=1e-10)
    with pytest.warns(UserWarning, match="own copy"):
        loaded = ftk.load_adapter(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=1e-10, atol=1e-10)


def test_from_peft_keeps_a_trained_copy_of_a_tied_head():
    """from_peft of a PEFT model whose modules_to_save copy of a tied lm_head was trained: the copy is
    the model's lm_head, and the config no longer claims tied embeddings, so tie_weights() (run by
    resize_token_embeddings, ...) keeps it (it put the untrained tensor back: 1.16 off)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    peft = get_peft_model(
        LlamaForCausalLM(cfg).double().eval(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    with torch.no_grad():
        peft.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
    ids = torch.randint(0, 99, (2, 7))
    ref = peft(input_ids=ids).logits
    model = ftk.from_peft(peft)
    model.tie_weights()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)
    assert not model.config.tie_word_embeddings
    cfg.tie_word_embeddings = True  # (the config object is the model's: from_peft cleared it)
    tied = ftk.from_peft(get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj"])))
    assert tied.config.tie_word_embeddings and tied.lm_head.weight is tied.model.embed_tokens.weight


def test_saved_adapter_loads_with_auto_peft_model(tmp_path):
    """save_adapter writes what AutoPeftModelFor*.from_pretrained needs, as PEFT does: the base model's
    path (from_pretrained's), and the task type from_peft found or else PEFT's auto mapping (it wrote
    neither: AutoPeftModel could not build the base)."""
    import json

    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, pad_token_id=0, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "lm")
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "cls")
    ids = torch.randint(1, 99, (2, 7))

    model = ftk.apply_lora(LlamaForCausalLM.from_pretrained(tmp_path / "lm").eval(), ["q_proj", "v_proj"], r=2)
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):
            nn.init.normal_(p.data)
    ftk.save_adapter(model, str(tmp_path / "a"))
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "lm"), LoraConfig(r=2, target_modules=["q_proj"]))
    peft.save_pretrained(tmp_path / "p")
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("a", "p"))
    for key in ("base_model_name_or_path", "task_type", "auto_mapping"):
        assert ours[key] == theirs[key], key
    back = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)

    peft = get_peft_model(
        LlamaForSequenceClassification.from_pretrained(tmp_path / "cls"),
        LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"),
    ).eval()
    for n, p in peft.named_parameters():
        if "lora_B" in n or "modules_to_save" in n:
            nn.init.normal_(p.data)
    ref = peft(input_ids=ids).logits
    model = ftk.from_peft(peft)
    ftk.save_adapter(model, str(tmp_path / "c"))
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    back = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "c").eval()
    torch.testing.assert_close(back(input_ids=ids).logits, ref)


def test_resized_vocabulary_travels_with_the_adapter(tmp_path):
    """Tokens added with resize_token_embeddings get random rows, which a fresh base does not have.
    As PEFT's save_embedding_layers="auto": the vocabulary differs from the base's config.json, so
    save_adapter writes the embedding tables (with a warning), and load_adapter writes the tables a
    file holds into the model (it refused PEFT's such files: keys with no place). Outputs equal after
    reloading, both ways with PEFT (they were off by the new rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")

    def fresh():  # the base with 6 new tokens, their rows drawn anew each time
        model = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
        model.resize_token_embeddings(105, mean_resizing=False)
        return model

    ids = torch.tensor([[1, 100, 5, 104, 7, 101]])
    model = ftk.apply_lora(fresh(), ["q_proj", "v_proj"], r=2)
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):
            nn.init.normal_(p.data)
    ref = model(input_ids=ids).logits
    assert (fresh()(input_ids=ids).logits - ref).abs().max() > 1e-3  # the new rows matter
    with pytest.warns(UserWarning, match=r"vocabulary \(105\) differs from the base model's \(99\)"):
        ftk.save_adapter(model, str(tmp_path / "ours"))
    torch.testing.assert_close(ftk.load_adapter(fresh(), str(tmp_path / "ours"))(input_ids=ids).logits, ref)
    back = PeftModel.from_pretrained(fresh(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(back(input_ids=ids).logits, ref)
    peft = get_peft_model(fresh(), LoraConfig(r=2, target_modules=["q_proj"])).eval()
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p.data)
    ref = peft(input_ids=ids).logits
    peft.save_pretrained(tmp_path / "peft")
    torch.testing.assert_close(ftk.load_adapter(fresh(), str(tmp_path / "peft"))(input_ids=ids).logits, ref)


def test_nested_modules_to_save_round_trip_through_peft(tmp_path):
    """A nested modules_to_save ("pooler.dense"): PEFT wraps every module whose name ends with a config
    entry, so the last name alone ("dense", as written before) wrapped every dense layer and PEFT's
    loader failed (KeyError). The config now holds the full name where the last name is ambiguous, and
    PEFT wraps that module alone, with the same outputs; ftk.load_adapter reads it back."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    torch.manual_seed(0)
    base = BertModel(cfg).eval()
    model = ftk.apply_lora(copy.deepcopy(base), ["query"], r=2, modules_to_save=["pooler.dense"])
    with torch.no_grad():
        model.pooler.dense.weight.add_(0.1)
    ids = torch.randint(0, 99, (2, 7))
    ref = model(input_ids=ids).pooler_output
    ftk.save_adapter(model, str(tmp_path))
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True).eval()
    wrapped = sorted(n for n, m in back.named_modules() if type(m).__name__ == "ModulesToSaveWrapper")
    assert wrapped == ["base_model.model.pooler.dense"]
    torch.testing.assert_close(back(input_ids=ids).pooler_output, ref)
    torch.testing.assert_close(ftk.load_adapter(copy.deepcopy(base), str(tmp_path))(input_ids=ids).pooler_output, ref)
    # a name PEFT cannot single out (BERT's "embeddings" ends its nested tables' names too): a warning
    model = ftk.apply_lora(copy.deepcopy(base), ["query"], r=2, modules_to_save=["embeddings"])
    with pytest.warns(UserWarning, match=r"would also wrap embeddings.word_embeddings"):
        ftk.save_adapter(model, str(tmp_path / "e"))
    ref = model(input_ids=ids).pooler_output
    torch.testing.assert_close(
        ftk.load_adapter(copy.deepcopy(base), str(tmp_path / "e"))(input_ids=ids).pooler_output, ref
    )


@pytest.mark.parametrize("init", ["pissa", "olora", "mica"])
def test_inits_peft_runs_again_at_load_round_trip(init, tmp_path):
    """PiSSA / OLoRA train A and B against a residual base (W - s B0 A0) that PEFT's loader rebuilds from
    the original weights; MiCA freezes B. Their files load into ours with PEFT's outputs and trainable
    set (before: the original base under the trained A, B, 1.2 off), and save_adapter of a from_peft model
    keeps init_lora_weights, so PEFT rebuilds the same base (before: the same 1.2 off)."""
    torch.manual_seed(9)
    base = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8))
    x = torch.randn(3, 16)
    peft = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=init)
    )
    _trained(peft)
    want = peft(x)
    peft.save_pretrained(str(tmp_path / "peft"))
    fresh = copy.deepcopy(base)
    mine = ftk.load_adapter(fresh, str(tmp_path / "peft"))
    assert mine is fresh and isinstance(mine[0], ftk.nn.LoRALinear)
    torch.testing.assert_close(mine(x), want)
    trained = sorted(n for n, q in mine.named_parameters() if q.requires_grad)
    assert trained == sorted(_peft_name_inv(n) for n, q in peft.named_parameters() if q.requires_grad)
    with pytest.raises(ValueError, match=f"init_lora_weights=.{init}.*without LoRA layers"):
        ftk.load_adapter(mine, str(tmp_path / "peft"))
    fused = ftk.from_peft(copy.deepcopy(peft))
    ftk.save_adapter(fused, str(tmp_path / "ours"))
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(back(x), want)


def _peft_name_inv(name):
    """PEFT's parameter name -> ours (``base_model.model.0.lora_A.default.weight`` -> ``0.lora_A``)."""
    return name.removeprefix("base_model.model.").replace(".default.weight", "")


def test_layer_replication_round_trip(tmp_path):
    """PEFT's layer_replication stacks repeated decoder layers (shared weights) before placing the
    adapters: its file loads into ours with PEFT's logits (before: a key error), and save_adapter after
    from_peft keeps layer_replication (before: PEFT loaded it onto the unrepeated model, 0.37 off)."""
    torch.manual_seed(10)
    base = _llama_lm()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 2]])
    peft = _trained(get_peft_model(copy.deepcopy(base), cfg))
    ids = torch.randint(0, 99, (2, 9))
    want = peft(input_ids=ids).logits
    peft.save_pretrained(str(tmp_path / "peft"))
    mine = ftk.load_adapter(copy.deepcopy(base), str(tmp_path / "peft"))
    assert len(mine.model.layers) == 3 and isinstance(mine.model.layers[2].self_attn.q_proj, ftk.nn.LoRALinear)
    torch.testing.assert_close(mine(input_ids=ids).logits, want)
    ftk.save_adapter(ftk.from_peft(copy.deepcopy(peft)), str(tmp_path / "ours"))
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(back(input_ids=ids).logits, want)


@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian", False, "orthogonal", "mica", "pissa_niter_4"])
def test_apply_lora_with_peft_inits(init, tmp_path):
    """apply_lora(init_lora_weights=...) computes PEFT's init (PiSSA / OLoRA change the base weights, MiCA
    freezes B): PEFT's outputs and trainable set; the trained adapter's file loads into PEFT over the
    original model with the same outputs (PiSSA's randomized SVD excepted, with a warning)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8))
    x = torch.randn(3, 16)
    torch.manual_seed(1)
    ours = ftk.apply_lora(copy.deepcopy(base), ["0", "2"], r=4, alpha=8, init_lora_weights=init)
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=init)
    peft = get_peft_model(copy.deepcopy(base), cfg)
    assert isinstance(ours[0], ftk.nn.LoRALinear)
    torch.testing.assert_close(ours(x), peft(x))
    assert sorted(n for n, q in ours.named_parameters() if q.requires_grad) == sorted(
        _peft_name_inv(n) for n, q in peft.named_parameters() if q.requires_grad
    )
    with torch.no_grad():
        for q in ours.parameters():
            if q.requires_grad:
                q.add_(0.1 * torch.randn_like(q))
    if init == "pissa_niter_4":
        with pytest.warns(UserWarning, match="randomized SVD"):
            ftk.save_adapter(ours, str(tmp_path))
        return
    ftk.save_adapter(ours, str(tmp_path))
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(back(x), ours(x))


def test_apply_lora_refuses_other_inits_and_existing_layers():
    model = ftk.apply_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), ["0"], r=2)
    with pytest.raises(ValueError, match="apply every target in one call"):
        ftk.apply_lora(model, ["1"], r=2, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="init_lora_weights='eva' is not one apply_lora takes"):
        ftk.apply_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2, init_lora_weights="eva")
    pissa = ftk.apply_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), ["0"], r=2, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="init_lora_weights='pissa', which PEFT's loader redoes"):
        ftk.apply_lora(pissa, ["1"], r=2)  # (its file would say PiSSA for the new layer too)
