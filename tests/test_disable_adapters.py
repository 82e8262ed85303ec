"""``ftk.disable_adapters(model)``: the base model's outputs inside (every fused LoRA layer kind, a
shared-input group, DoRA, PEFT's trainable tokens), PEFT's ``disable_adapter()`` outputs, no adapter
gradient, everything restored on exit (an exception included), and the refusals."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import ftkernels as ftk
from ftkernels.peft_compat import lora_modules


class Zoo(nn.Module):
    """One of each layer kind: an embedding, q/k/v siblings reading one x (a shared-input group), an HF
    Conv1D, nn.MultiheadAttention, a Conv1d, and a module whose parameter is adapted (LoRAParams)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.q, self.k, self.v = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 12)
        self.c1d = Conv1D(12, 12)
        self.mha = nn.MultiheadAttention(12, 2, batch_first=True)
        self.conv = nn.Conv1d(12, 12, 3, padding=1)
        self.gate = Gate()

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.tanh(self.q(h) + self.k(h) * self.v(h))
        h = self.c1d(h)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.gate(h)


class Gate(nn.Module):
    """A module reading its own weight (a router's way)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(12, 12))

    def forward(self, h):
        return h @ self.weight.t()


def _adapted(dora=False):
    """(the original float64 model, a copy with LoRA on every layer, B and A moved off their init)."""
    torch.manual_seed(0)
    base = Zoo().double().eval()
    if dora:  # (PEFT takes DoRA on neither nn.MultiheadAttention nor parameters; neither do we)
        model = ftk.apply_lora(copy.deepcopy(base), ["emb", "q", "k", "v", "c1d", "conv"], r=2, use_dora=True)
    else:
        targets = ["emb", "q", "k", "v", "c1d", "mha", "conv"]
        model = ftk.apply_lora(copy.deepcopy(base), targets, r=2, target_parameters=["gate.weight"])
    model.eval()
    with torch.no_grad():
        for _, q in model.named_parameters():
            if q.requires_grad:
                q.add_(0.3 * torch.randn_like(q))
    return base, model


@pytest.mark.parametrize("dora", [False, True])
def test_inside_is_the_base_model_and_outside_is_unchanged(dora):
    base, model = _adapted(dora)
    ids = torch.randint(0, 20, (3, 7))
    for _ in range(2):  # (the q/k/v group learns its order from the first calls)
        want = model(ids)
    if not dora:  # (DoRA layers run alone)
        assert model.q._lora_group is not None and model.q._lora_group.order is not None
    assert (want - base(ids)).abs().max() > 1e-2  # the adapters count
    with ftk.disable_adapters(model) as same:
        assert same is model
        y = model(ids)
        # (to rounding: torch's attention picks another kernel when its weights need no gradient)
        torch.testing.assert_close(y, base(ids), rtol=1e-12, atol=1e-12)
        assert not y.requires_grad  # no adapter in the graph: nothing to train through
    torch.testing.assert_close(model(ids), want, rtol=0, atol=0)
    assert not any(m.disabled for m in lora_modules(model).values())


def test_restored_after_an_exception_and_refusals():
    base, model = _adapted()
    ids = torch.randint(0, 20, (2, 5))
    want = model(ids)
    with pytest.raises(RuntimeError, match="inside"):
        with ftk.disable_adapters(model):
            raise RuntimeError("inside")
    torch.testing.assert_close(model(ids), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no fused LoRA layer"):
        with ftk.disable_adapters(base):
            pass
    model.q.merge()
    with pytest.raises(ValueError, match=r"1 LoRA layer\(s\) \(q, ...\) are merged"):
        with ftk.disable_adapters(model):
            pass
    assert not any(m.disabled for m in lora_modules(model).values())


def test_modules_to_save_keep_their_trained_weights_with_a_warning():
    torch.manual_seed(1)
    model = ftk.apply_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), ["0"], r=2, modules_to_save=["1"])
    with pytest.warns(UserWarning, match=r"modules_to_save \(1\) were trained in place"):
        with ftk.disable_adapters(model):
            pass


def test_matches_peft_disable_adapter_with_trainable_tokens():
    """A PEFT model with LoRA and trainable tokens, converted by from_peft: inside, the outputs of
    PEFT's own disable_adapter() (the original rows of the token table too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, max_position_embeddings=32,
    )  # fmt: skip
    base = LlamaForCausalLM(cfg).double().eval()
    targets = ["q_proj", "v_proj", "down_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, trainable_token_indices=[3, 5])
    peft = get_peft_model(copy.deepcopy(base), lora).eval()
    with torch.no_grad():
        for _, q in peft.named_parameters():
            if q.requires_grad:
                q.add_(0.3 * torch.randn_like(q))
    ids = torch.tensor([[3, 5, 7, 9, 3], [1, 2, 5, 4, 8]])
    with peft.disable_adapter():
        want = peft(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = ftk.from_peft(copy.deepcopy(peft))
    adapted = ours(input_ids=ids).logits
    assert (adapted - want).abs().max() > 1e-2
    with ftk.disable_adapters(ours):
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours(input_ids=ids).logits, adapted, rtol=0, atol=0)
    torch.testing.assert_close(want, base(input_ids=ids).logits, rtol=1e-12, atol=1e-12)


def test_quantized_base_runs_alone():
    """A QLoRA layer (bitsandbytes NF4) inside: the quantized base's own output."""
    pytest.importorskip("bitsandbytes")
    from helpers.lora import quantized

    torch.manual_seed(3)
    layer = ftk.nn.LoRAQuantLinear(quantized(64, 32, "nf4"), r=4)
    model = nn.Sequential(layer)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 64)
    want = layer.base(x)
    assert (layer(x) - want).abs().max() > 1e-2
    with ftk.disable_adapters(model):
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
