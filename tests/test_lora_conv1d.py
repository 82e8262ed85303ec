"""LoRA on Hugging Face Conv1D (GPT-2's transposed linear) against PEFT's fan_in_fan_out LoRA."""

import pytest
import torch
from helpers.lora import FixedMaskDropout
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

import ftkernels as ftk


def make_pair(nx, nf, r, p=0.0, dtype=torch.float64):
    conv = Conv1D(nf, nx).to(dtype)
    peft_conv = Conv1D(nf, nx).to(dtype)
    with torch.no_grad():
        conv.bias.normal_()
    peft_conv.load_state_dict(conv.state_dict())
    ours = ftk.nn.LoRAConv1D(conv, r=r, alpha=2 * r, dropout=p).to(dtype)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, fan_in_fan_out=True)
    peft = PeftLinear(peft_conv, "default", config=cfg, r=r, lora_alpha=2 * r, is_target_conv_1d_layer=True)
    with torch.no_grad():
        ours.lora_B.normal_()
        peft.lora_A["default"].weight.copy_(ours.lora_A)
        peft.lora_B["default"].weight.copy_(ours.lora_B)
    peft.to(dtype)
    return ours, peft


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_matches_peft_fan_in_fan_out(dtype, p):
    ours, peft = make_pair(24, 36, 4, p=p, dtype=dtype)
    seed = 31
    peft.lora_dropout["default"] = FixedMaskDropout(seed, p) if p > 0 else nn.Identity()
    x = torch.randn(2, 5, 24, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y = ftk.nn.lora_linear(
        x, ours.linear_weight(), ours.bias, ours.lora_A, ours.lora_B, ours.scaling, p, True, torch.tensor(seed)
    )
    yp = peft(x2)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(y, yp, atol=tol, rtol=tol)
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, (x, ours.lora_A, ours.lora_B), g)
    gp = torch.autograd.grad(yp, (x2, peft.lora_A["default"].weight, peft.lora_B["default"].weight), g)
    for a, b in zip(ga, gp, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    ours.eval(), peft.eval()
    peft.lora_dropout["default"] = nn.Identity()  # our fixed-mask stand-in ignores eval mode
    torch.testing.assert_close(ours(x), peft(x2))


def test_shapes_merge_and_gradcheck():
    ours, _ = make_pair(10, 6, 2, p=0.25)
    assert (ours.in_features, ours.out_features) == (10, 6) and (ours.nx, ours.nf) == (10, 6)  # Conv1D names too
    assert ours.lora_A.shape == (2, 10) and ours.lora_B.shape == (6, 2)
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(8)

    def f(x, a, b):
        return ftk.nn.lora_linear(x, ours.linear_weight(), ours.bias, a, b, ours.scaling, 0.25, True, seed)

    assert torch.autograd.gradcheck(f, (x, ours.lora_A, ours.lora_B))
    ours.eval()
    y = ours(x)
    w0 = ours.base.weight.clone()
    ours.merge()
    torch.testing.assert_close(ours.base(x), y)  # folded into the [in, out] weight
    ours.unmerge()
    torch.testing.assert_close(ours.base.weight, w0)


def test_from_peft_gpt2_attention():
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=50)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    model = get_peft_model(GPT2Model(cfg), lcfg)
    layer = model.base_model.model.h[0].attn.c_attn
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    model.eval()
    ids = torch.randint(0, 50, (2, 7))
    want = model(input_ids=ids).last_hidden_state
    fused = ftk.nn.LoRALinear.from_peft_layer(layer)
    assert isinstance(fused, ftk.nn.LoRAConv1D)
    model.base_model.model.h[0].attn.c_attn = fused
    fused.eval()
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, want)


def test_rejects_other_bases():
    with pytest.raises(TypeError, match="Conv1D"):
        ftk.nn.LoRAConv1D(nn.Linear(4, 4), r=2)
