"""LoRA bias (PEFT's ``lora_bias=True``: a trained bias on lora_B, ``y += scaling * lora_bias``) on the
Linear, HF Conv1D, conv and quantized LoRA layers, against PEFT: outputs and every gradient with and
without dropout, shared-input groups, gradcheck, 16-bit bases, merge / unload, adapter files both ways,
apply_lora, Opacus, and what is refused."""

import copy
import importlib.util
import json
import sys
import warnings

import pytest
import torch
from helpers.lora import compare_with_peft, files_both_ways, fix_dropout, peft_random, quantized, trainable
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import ftkernels as ftk
from ftkernels.peft_compat import lora_modules

SEED = 5


def fixed_seed(monkeypatch):
    """Every fused layer's dropout seed is SEED (PEFT's slots get that seed's mask: :func:`fix_dropout`)."""
    module = sys.modules["ftkernels.nn.lora_linear"]  # (ftk.nn.lora_linear is the function)
    monkeypatch.setattr(module, "draw_seed", lambda device: torch.tensor(SEED, device=device))


def model_of(kind):
    """(base model, targets, LoraConfig extras, input) per layer kind; the second target has no base bias
    (but HF Conv1D, which always has one)."""
    if kind == "linear":
        base = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 7, bias=False))
        return base, ["0", "2"], {}, torch.randn(3, 5, 12, dtype=torch.float64)
    if kind == "hf_conv1d":
        base = nn.Sequential(Conv1D(10, 12), nn.Tanh(), Conv1D(7, 10))
        return base, ["0", "2"], dict(fan_in_fan_out=True), torch.randn(3, 5, 12, dtype=torch.float64)
    if kind == "conv2d":
        base = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(6, 5, 1, bias=False))
        return base, ["0", "2"], {}, torch.randn(2, 4, 7, 9, dtype=torch.float64)
    base = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.Tanh(), nn.Conv1d(6, 5, 1, bias=False))
    return base, ["0", "2"], {}, torch.randn(2, 4, 11, dtype=torch.float64)


KINDS = ["linear", "hf_conv1d", "conv2d", "conv1d"]


def pair(kind, p=0.0):
    """(PEFT model with random A, B and LoRA biases, its from_peft conversion, x), float64."""
    torch.manual_seed(0)
    base, targets, extra, x = model_of(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "lora_bias=True ... has no bias": merging impossible
        peft = peft_random(base.double(), targets, p=p, lora_bias=True, **extra).train()
    ours = ftk.from_peft(copy.deepcopy(peft)).train()
    return base.double(), peft, ours, x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_matches_peft(kind, p, monkeypatch):
    """Outputs, grad_x and the grads of A, B, the LoRA bias (and a base bias left trainable), float64."""
    _, peft, ours, x = pair(kind, p)
    layers = lora_modules(ours)
    assert all(m.has_lora_bias for m in layers.values()) and len(layers) == 2
    assert all(torch.count_nonzero(m.lora_bias) == m.lora_bias.numel() for m in layers.values())
    peft.base_model.model[0].base_layer.bias.requires_grad_(True)
    ours[0].base.bias.requires_grad_(True)
    if p:
        fix_dropout(peft, SEED, p)
        fixed_seed(monkeypatch)
    compare_with_peft(ours, peft, x)
    assert "0.lora_bias" in trainable(ours) and "2.lora_bias" in trainable(ours)


def test_shared_input_group_matches_peft(monkeypatch):
    """q / k / v siblings with LoRA biases run as one group node, with PEFT's outputs and grads."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8, bias=False), nn.Linear(16, 4)

        def forward(self, x):
            return torch.cat([self.q(x), self.k(x).tanh(), self.v(x)], -1)

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = peft_random(Attn().double(), ["q", "k", "v"], p=0.2, lora_bias=True).train()
    ours = ftk.from_peft(copy.deepcopy(peft)).train()
    fix_dropout(peft, SEED, 0.2)
    fixed_seed(monkeypatch)
    x = torch.randn(3, 16, dtype=torch.float64)
    for _ in range(2):  # the group learns its members' order from the first calls
        ours(x)
    group = ours.q._lora_group
    assert group is not None and group.order is not None and len(group.order) == 3
    compare_with_peft(ours, peft, x)
    with torch.no_grad():  # an in-place update of one member's LoRA bias between the calls is seen
        ours(x)
        ours.k.lora_bias.add_(1.0)
        peft.base_model.model.k.lora_B["default"].bias.add_(1.0)
    compare_with_peft(ours, peft, x)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_gradcheck(kind, monkeypatch):
    """gradcheck through x, A, B and the LoRA bias, dropout on (a fixed seed: the same mask each call)."""
    fixed_seed(monkeypatch)
    torch.manual_seed(2)
    if kind == "linear":
        layer = ftk.nn.LoRALinear(nn.Linear(7, 5).double(), r=2, alpha=3, dropout=0.25, lora_bias=True)
        x = torch.randn(4, 7, dtype=torch.float64)
    else:
        layer = ftk.nn.LoRAConv2d(nn.Conv2d(3, 4, 3, padding=1).double(), r=2, alpha=3, dropout=0.25, lora_bias=True)
        x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    assert torch.count_nonzero(layer.lora_bias) == 0  # PEFT's init: zero
    with torch.no_grad():
        layer.lora_B.normal_()
    names = ("lora_A", "lora_B", "lora_bias")

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (x,))

    params = [torch.randn_like(getattr(layer, n)).requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), *params))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_16bit_base_against_float64(kind, dtype):
    """fp32 adapters and LoRA bias over a 16-bit base: output and the LoRA bias's fp32 gradient within
    16-bit rounding of the float64 layer's."""
    _, _, ours, x = pair(kind)
    layer = ours[0]
    y64 = layer(x)
    g = torch.randn_like(y64)
    (want,) = torch.autograd.grad(y64, layer.lora_bias, g)
    layer.base.to(dtype)
    for n in ("lora_A", "lora_B", "lora_bias"):
        getattr(layer, n).data = getattr(layer, n).data.float()
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    (got,) = torch.autograd.grad(y, layer.lora_bias, g.to(dtype))
    assert got.dtype == torch.float32
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    assert (y.double() - y64).abs().max() <= tol * y64.abs().max()
    assert (got.double() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_and_unload(kind):
    """Merging folds scaling * lora_bias into the base bias (PEFT's merged weights); unmerging restores
    it; a base without a bias cannot take it: merge_lora raises before changing anything."""
    base, peft, ours, x = pair(kind)
    ours.eval(), peft.eval()
    want = ours(x)
    b0 = ours[0].base.bias.detach().clone()
    ours[0].merge()
    torch.testing.assert_close(ours[0].base.bias, b0 + ours[0].scaling * ours[0].lora_bias.detach())
    ours[0].unmerge()
    torch.testing.assert_close(ours[0].base.bias, b0, rtol=0, atol=1e-15)
    torch.testing.assert_close(ours(x), want)
    want = ours(x)  # (the weight after the round trip: equal to rounding)
    if ours[2].base.bias is None:
        with pytest.raises(NotImplementedError, match="no bias to take the LoRA bias"):
            ftk.merge_lora(ours)
        assert not any(m.merged for m in lora_modules(ours).values())
        torch.testing.assert_close(ours(x), want, rtol=0, atol=0)
        # With a bias on every base it merges and unloads as PEFT's merge_and_unload.
        ours[2].base.bias = nn.Parameter(torch.randn(ours[2].lora_bias.shape[0], dtype=torch.float64))
        peft.base_model.model[2].base_layer.bias = nn.Parameter(ours[2].base.bias.detach().clone())
        want = ours(x)
    torch.testing.assert_close(want, peft(x))
    plain = ftk.unload_lora(copy.deepcopy(ours), merge=True)
    torch.testing.assert_close(plain(x), want)
    ref = peft.merge_and_unload()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[k], v, msg=k)


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_files_both_ways(kind, tmp_path):
    """PEFT's lora_bias adapter loads into ours (PEFT's outputs), and save_adapter writes lora_bias and
    lora_B.bias, which PEFT loads back with the same outputs."""
    base, peft, _, x = pair(kind)
    peft.eval()
    mine = files_both_ways(base, peft, x, tmp_path)
    assert all(m.has_lora_bias for m in lora_modules(mine).values())
    with open(tmp_path / "ours" / "adapter_config.json") as f:
        assert json.load(f)["lora_bias"] is True


def test_apply_lora_trains_what_peft_trains():
    """apply_lora(lora_bias=True) and get_peft_model(lora_bias=True): the same trainable tensors (the
    LoRA biases zero), then the same outputs and grads with PEFT's values copied in."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(3)
    model = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=99)).eval()
    ours = ftk.apply_lora(copy.deepcopy(model), ["c_attn", "c_fc"], r=4, alpha=8, lora_bias=True)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True)
    peft = get_peft_model(copy.deepcopy(model), cfg)
    mine, theirs = trainable(ours), trainable(peft)
    assert set(mine) == set(theirs) and sum("lora_bias" in n for n in mine) == 4
    assert all(torch.count_nonzero(q) == 0 for n, q in mine.items() if n.endswith("lora_bias"))
    with torch.no_grad():
        for n, q in theirs.items():
            q.normal_(std=0.3) if "lora_A" not in n else None
            mine[n].copy_(q)
    ids = torch.randint(0, 99, (2, 7))
    y, yp = ours(input_ids=ids).last_hidden_state, peft(input_ids=ids).last_hidden_state
    torch.testing.assert_close(y, yp, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    yp.backward(g)
    for n, q in mine.items():
        torch.testing.assert_close(q.grad, theirs[n].grad, rtol=1e-4, atol=1e-5 * theirs[n].grad.abs().max(), msg=n)


def test_refusals(tmp_path):
    """DoRA, embeddings, nn.MultiheadAttention and parameter targets take no LoRA bias (as PEFT); a file
    and a model disagreeing on lora_bias, and a model mixing both kinds for save_adapter, raise."""
    with pytest.raises(ValueError, match="lora_bias is not supported with DoRA"):
        ftk.nn.LoRALinear(nn.Linear(4, 3), dora=True, lora_bias=True)
    with pytest.raises(ValueError, match="lora_bias is not supported with DoRA"):
        ftk.nn.LoRAConv2d(nn.Conv2d(4, 3, 1), dora=True, lora_bias=True)
    for layer in (nn.Embedding(9, 4), nn.MultiheadAttention(8, 2)):
        before = copy.deepcopy(layer.state_dict())
        model = nn.Sequential(layer)
        with pytest.raises(ValueError, match=f"lora_bias is not supported on an nn.{type(layer).__name__}"):
            ftk.apply_lora(model, ["0"], lora_bias=True)
        assert type(model[0]) is type(layer) and all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="lora_bias"):
        ftk.apply_lora(nn.Sequential(experts), [], target_parameters=["gate_up_proj"], lora_bias=True)
    # a file with LoRA biases into a model whose LoRA layers have none (and the other way round)
    base, peft, _, _ = pair("linear")
    peft.save_pretrained(str(tmp_path / "peft"))
    plain = ftk.apply_lora(copy.deepcopy(base), ["0", "2"], r=3, alpha=6)
    with pytest.raises(ValueError, match="lora_bias=True but the model's LoRA layers have no LoRA bias"):
        ftk.load_adapter(plain, str(tmp_path / "peft"))
    mixed = ftk.apply_lora(copy.deepcopy(base), ["0"], lora_bias=True)
    ftk.apply_lora(mixed, ["2"])
    with pytest.raises(ValueError, match="some LoRA layers have a LoRA bias and some not"):
        ftk.save_adapter(mixed, str(tmp_path / "mixed"))


opacus_missing = importlib.util.find_spec("opacus") is None


@pytest.mark.skipif(opacus_missing, reason="opacus is not installed")
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opacus_per_sample_gradients(p):
    """Opacus's per-sample gradients of the LoRA bias (s * sum of the output gradient per example) and
    of the rest, against per-example autograd on the same forward (same masks)."""
    from opacus import GradSampleModule

    torch.manual_seed(4)
    model = nn.Sequential(
        ftk.nn.LoRALinear(nn.Linear(7, 9), r=3, alpha=5, dropout=p, lora_bias=True),
        nn.Tanh(),
        ftk.nn.LoRAConv1D(Conv1D(4, 9), r=2, alpha=4, dropout=p, lora_bias=True),
    ).double()
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.lora_B.normal_()
            m.lora_bias.normal_()
    x = torch.randn(5, 6, 7, dtype=torch.float64)
    twin = copy.deepcopy(model)
    params = [q for q in twin.parameters() if q.requires_grad]
    torch.manual_seed(11)
    ref = twin(x)
    rows = [torch.autograd.grad(ref[n].square().sum(), params, retain_graph=True) for n in range(5)]
    want = {q: torch.stack([r[i] for r in rows]) for i, q in enumerate(params)}
    gsm = GradSampleModule(model, loss_reduction="sum")
    torch.manual_seed(11)
    out = gsm(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.square().sum().backward()
    got = [q for q in model.parameters() if q.requires_grad]
    assert sum(q.shape == (9,) or q.shape == (4,) for q in got) == 2  # the two LoRA biases
    for q, tq in zip(got, params, strict=True):
        torch.testing.assert_close(q.grad_sample, want[tq], rtol=1e-10, atol=1e-12)


BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(not BNB, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_matches_peft(kind, tmp_path):
    """QLoRA with a LoRA bias: PEFT's bitsandbytes layers' outputs and grads (the adapter output with its
    bias rounded to y's dtype, then added). Merging folds scaling * lora_bias into the base bias (PEFT's
    bitsandbytes merge adds it unscaled, which its own forward does not compute)."""
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    from peft.tuners.lora.bnb import Linear8bitLt as PeftLinear8bitLt

    torch.manual_seed(6)
    base = quantized(64, 48, kind)
    cfg = LoraConfig(r=4, lora_alpha=12, lora_bias=True)
    cls = PeftLinear8bitLt if kind == "int8" else PeftLinear4bit
    peft = cls(copy.deepcopy(base), "default", config=cfg, r=4, lora_alpha=12)
    with torch.no_grad():
        peft.lora_B["default"].weight.normal_()
        peft.lora_B["default"].bias.normal_()
    ours = ftk.nn.LoRALinear.from_peft_layer(peft)
    assert isinstance(ours, ftk.nn.LoRAQuantLinear) and ours.has_lora_bias
    x = torch.randn(5, 64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, yp = ours(x1), peft(x2)
    torch.testing.assert_close(y, yp, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    mine = (x1, ours.lora_A, ours.lora_B, ours.lora_bias)
    theirs = (x2, peft.lora_A["default"].weight, peft.lora_B["default"].weight, peft.lora_B["default"].bias)
    for a, b in zip(torch.autograd.grad(y, mine, g), torch.autograd.grad(yp, theirs, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    b0 = ours.base.bias.detach().clone()
    with pytest.warns(UserWarning, match="quantized again"):
        ours.merge()
    torch.testing.assert_close(ours.base.bias, b0 + ours.scaling * ours.lora_bias.detach())
    assert (ours(x) - y).abs().max() <= 0.2 * y.abs().max()  # requantization rounding only


def test_compiles_without_graph_breaks():
    """torch.compile (fullgraph) of layers with LoRA biases: the eager outputs and LoRA bias grads (the
    same dropout seeds under aot_eager)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 6))
    ftk.apply_lora(model, ["0", "2"], r=4, dropout=0.2, lora_bias=True)
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.lora_B.normal_()
            m.lora_bias.normal_()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 16)
    got = []
    for run in (compiled, model):
        torch.manual_seed(0)
        y = run(x)
        y.square().sum().backward()
        got.append((y.detach(), model[0].lora_bias.grad.clone(), model[2].lora_bias.grad.clone()))
        model.zero_grad()
    for a, b in zip(*got, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_peft(dtype, monkeypatch):
    """The CUDA kernels (fused node, shared-input group) with LoRA biases against PEFT on the GPU."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(256, 192), nn.Linear(256, 64, bias=False)

        def forward(self, x):
            return torch.cat([self.q(x), self.k(x)], -1)

    torch.manual_seed(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = peft_random(Attn().cuda().to(dtype), ["q", "k"], r=16, alpha=32, p=0.1, lora_bias=True).train()
    ours = ftk.from_peft(copy.deepcopy(peft)).train()
    fix_dropout(peft, SEED, 0.1)
    fixed_seed(monkeypatch)
    x = torch.randn(4, 33, 256, device="cuda", dtype=dtype)
    for _ in range(2):
        ours(x)
    assert ours.q._lora_group.order is not None
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, yp = ours(x1), peft(x2)
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close(y, yp, atol=tol * 4, rtol=tol)
    g = torch.randn_like(y)
    y.backward(g)
    yp.backward(g)
    mine, theirs = trainable(ours), trainable(peft)
    assert set(mine) == set(theirs) and "q.lora_bias" in mine
    for n, q in mine.items():
        ref = theirs[n].grad
        torch.testing.assert_close(q.grad, ref, atol=tol * 4 * max(1.0, ref.abs().max().item()), rtol=tol, msg=n)
