"""from_peft on PEFT models holding several adapters: the converted model computes what PEFT's does
with the same adapter active (float64, exact), or from_peft refuses before changing anything."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import ftkernels as ftk
from ftkernels.nn.lora_mha import peft_doubles_out_proj


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(16, 24), nn.Linear(24, 8), nn.Linear(8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        return self.head(h + self.attn(h, h, h, need_weights=False)[0])


def _two_adapters():
    """'default' on a, b and attn (head saved whole), 'other' on a only; both random, float64."""
    torch.manual_seed(0)
    net = Net().double()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["a", "b", "attn"], modules_to_save=["head"])
    peft = get_peft_model(net, LoraConfig(**{**cfg.to_dict(), "init_lora_weights": False}))
    peft.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["a"], init_lora_weights=False))
    with torch.no_grad():  # a trained head copy, so running it or the original differs
        peft.base_model.model.head.modules_to_save["default"].weight.add_(1.0)
    return peft, torch.randn(3, 5, 16, dtype=torch.float64)


def _peft_layers(model):
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def test_active_adapter_on_some_layers_leaves_the_others_plain():
    """'other' covers a only: b and attn go back to their plain bases (out_proj unwrapped too) and the
    head to its original module, as PEFT runs them with 'other' active; the config saved is 'other''s."""
    peft, x = _two_adapters()
    peft.set_adapter("other")
    peft.eval()
    want = peft(x)
    with pytest.warns(UserWarning, match="dropped adapters \\['default'\\]"):
        fused = ftk.from_peft(peft).eval()
    torch.testing.assert_close(fused(x), want, rtol=0, atol=1e-12)
    assert isinstance(fused.a, ftk.nn.LoRALinear) and fused.a.r == 2
    assert type(fused.b) is nn.Linear and type(fused.head) is nn.Linear
    assert (
        type(fused.attn) is nn.MultiheadAttention
        and type(fused.attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    )
    assert not _peft_layers(fused)
    assert fused._ftk_lora_config["r"] == 2 and fused._ftk_lora_config["lora_alpha"] == 6
    assert [n for n, p in fused.named_parameters() if p.requires_grad] == ["a.lora_A", "a.lora_B"]


def test_adapter_name_picks_an_inactive_adapter():
    """adapter_name='other' while 'default' is active: the result equals PEFT with 'other' active."""
    peft, x = _two_adapters()
    twin, _ = _two_adapters()  # the same weights (same seed), with 'other' made active
    twin.set_adapter("other")
    want = twin.eval()(x)
    with pytest.warns(UserWarning):
        fused = ftk.from_peft(peft, adapter_name="other").eval()
    torch.testing.assert_close(fused(x), want, rtol=0, atol=1e-12)


def test_default_adapter_still_converts_everything():
    """The active 'default' (a, b, attn, head copy) converts whole; 'other' is dropped with a warning."""
    peft, x = _two_adapters()
    want = peft.eval()(x)
    with pytest.warns(UserWarning, match="other"):
        fused = ftk.from_peft(peft).eval()
    if peft_doubles_out_proj():  # PEFT 0.21's MHA adds its out_proj delta twice (huggingface/peft#3774)
        fused.attn.out_lora_B.data *= 2
    torch.testing.assert_close(fused(x), want, rtol=0, atol=1e-12)
    assert isinstance(fused.attn, ftk.nn.LoRAMultiheadAttention) and isinstance(fused.b, ftk.nn.LoRALinear)


def _unchanged(peft, before):
    assert _peft_layers(peft.base_model.model) == before


def test_two_active_adapters_are_refused():
    """PEFT sums active adapters; a fused layer holds one: refused, with the way out named."""
    peft, _ = _two_adapters()
    before = _peft_layers(peft.base_model.model)
    peft.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"2 adapters are active .*adapter_name="):
        ftk.from_peft(peft)
    _unchanged(peft, before)
    with pytest.warns(UserWarning):  # naming one is an explicit choice
        ftk.from_peft(peft, adapter_name="default")


def test_unknown_adapter_and_disabled_adapters_are_refused():
    peft, _ = _two_adapters()
    before = _peft_layers(peft.base_model.model)
    with pytest.raises(ValueError, match=r"no LoRA layer holds adapter 'nope'; the model has \['default', 'other'\]"):
        ftk.from_peft(peft, adapter_name="nope")
    peft.base_model.disable_adapter_layers()
    with pytest.raises(ValueError, match="disabled"):
        ftk.from_peft(peft)
    _unchanged(peft, before)


def test_another_adapter_merged_is_refused():
    """'other' merged into a's base while 'default' is converted: the base would carry other's delta
    under a layer that says it is unmerged; refused, nothing changed."""
    peft, _ = _two_adapters()
    before = _peft_layers(peft.base_model.model)
    peft.base_model.model.a.merge(adapter_names=["other"])
    with pytest.raises(NotImplementedError, match=r"\['other'\] merged .* 'default'"):
        ftk.from_peft(peft)
    _unchanged(peft, before)
