"""LoRAMultiheadAttention: nn.MultiheadAttention with LoRA on in_proj and out_proj, against torch's
layer run on the adapted weights (float64), PEFT's lora.MultiheadAttention, and an explicit
reference for LoRA dropout."""

import contextlib
import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import ftkernels as ftk
from ftkernels.nn import LoRAMultiheadAttention
from ftkernels.nn.lora_mha import peft_doubles_out_proj
from ftkernels.nn.reference import lora_keep_mask
from ftkernels.peft_compat import lora_modules


def make(E=16, heads=4, r=3, alpha=5, dropout=0.0, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    base = nn.MultiheadAttention(E, heads, **kw).to(dtype)
    layer = LoRAMultiheadAttention(base, r=r, alpha=alpha, dropout=dropout)
    with torch.no_grad():  # B starts at zero: random adapters, so the adapted weights differ
        for p in layer.parameters(recurse=False):
            p.copy_(torch.randn_like(p) * 0.5)
    return layer


def adapted(layer):
    """``{param name: adapted weight}`` of the base MHA, differentiable in the adapters."""
    s = layer.scaling
    return {
        "in_proj_weight": layer.base.in_proj_weight + s * layer.lora_B @ layer.lora_A,
        "out_proj.weight": layer.base.out_proj.weight + s * layer.out_lora_B @ layer.out_lora_A,
    }


def reference(layer, *args, **kw):
    """torch's own nn.MultiheadAttention.forward on the adapted weights (PEFT's function)."""
    return functional_call(layer.base, adapted(layer), args, kw)


def inputs(bf, batched=True, L=5, S=6, N=2, E=16, seed=1):
    g = torch.Generator().manual_seed(seed)

    def t(n):
        shape = ((N, n) if bf else (n, N)) if batched else (n,)
        return torch.randn(*shape, E, generator=g, dtype=torch.float64, requires_grad=True)

    return t(L), t(S), t(S)


def grads_of(out, layer, xs):
    y, w = out
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
    if w is not None:
        loss = loss + (w * torch.linspace(0.5, 2, w.numel(), dtype=w.dtype).view_as(w)).sum()
    ps = [layer.lora_A, layer.lora_B, layer.out_lora_A, layer.out_lora_B, *xs]
    return torch.autograd.grad(loss, ps, allow_unused=True)


def check_against_reference(layer, args, **kw):
    xs = [a for a in dict.fromkeys(args)]  # distinct tensors, in order
    got = layer(*args, **kw)
    want = reference(layer, *args, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    if want[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_of(got, layer, xs), grads_of(want, layer, xs), strict=True):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("bf", [False, True])
@pytest.mark.parametrize("which", ["self", "kv", "distinct"])
@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(add_bias_kv=True),
        dict(add_zero_attn=True),
        dict(bias=False),
        dict(add_bias_kv=True, add_zero_attn=True),
    ],
)
@pytest.mark.parametrize("need_weights", [True, False])
def test_matches_torch_on_adapted_weights(bf, which, opts, need_weights):
    layer = make(batch_first=bf, **opts)
    q, k, v = inputs(bf)
    args = {"self": (q, q, q), "kv": (q, k, k), "distinct": (q, k, v)}[which]
    check_against_reference(layer, args, need_weights=need_weights)
    if need_weights:
        check_against_reference(layer, args, need_weights=True, average_attn_weights=False)


@pytest.mark.parametrize("bf", [False, True])
@pytest.mark.parametrize("need_weights", [True, False])
def test_masks(bf, need_weights):
    layer = make(batch_first=bf, add_bias_kv=True)
    q, k, v = inputs(bf, L=5, S=6)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    float3d = torch.randn(2 * 4, 5, 6, generator=g, dtype=torch.float64)
    bool2d = torch.rand(5, 6, generator=g) > 0.7
    bool2d[:, 0] = False  # every query sees a key
    for kw in (
        dict(key_padding_mask=pad),
        dict(key_padding_mask=pad.double().masked_fill(pad, float("-inf"))),
        dict(attn_mask=bool2d),
        dict(attn_mask=float3d),
        dict(attn_mask=bool2d, key_padding_mask=pad),
    ):
        check_against_reference(layer, (q, k, k), need_weights=need_weights, **kw)
    layer_self = make(batch_first=bf)
    check_against_reference(layer_self, (q, q, q), need_weights=need_weights, attn_mask=causal, is_causal=True)


@pytest.mark.parametrize("need_weights", [True, False])
def test_unbatched(need_weights):
    layer = make()
    q, k, _ = inputs(False, batched=False)
    check_against_reference(
        layer, (q, k, k), need_weights=need_weights, key_padding_mask=torch.tensor([0, 0, 0, 0, 1, 1]).bool()
    )
    check_against_reference(layer, (q, q, q), need_weights=need_weights)


@pytest.mark.parametrize("need_weights", [True, False])
def test_attention_dropout_draws_as_torch(need_weights):
    """Attention dropout (the base's ``dropout``) in training draws the same mask as torch's layer: the
    same ops in the same order (LoRA dropout 0 draws nothing)."""
    layer = make(batch_first=True, dropout=0.0)
    layer.base.dropout = 0.3
    layer.train()
    q, _, _ = inputs(True)
    torch.manual_seed(7)
    got = layer(q, q, q, need_weights=need_weights)
    torch.manual_seed(7)
    want = reference(layer, q, q, q, need_weights=need_weights)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    layer.eval()  # and no dropout in eval
    torch.testing.assert_close(layer(q, q, q)[0], reference(layer.eval(), q, q, q)[0], rtol=1e-10, atol=1e-10)


def explicit(layer, x, seeds, p):
    """Self-attention with LoRA dropout, written out: ``x W^T + b + s D(x) A^T B^T`` for the packed
    projection and for out_proj, masks from our Philox stream (rows of x's logical ``[numel / E, E]``),
    softmax(q k^T / sqrt(d)) v per head. x ``[L, N, E]``."""
    base, s = layer.base, layer.scaling
    L, N, E = x.shape
    H, d = base.num_heads, E // base.num_heads

    def lora(t, w, b, a, bb, seed):
        t2 = t.reshape(-1, E)
        keep = lora_keep_mask(seed, t2.shape[0], E, p).to(t.dtype) / (1 - p)
        return (t2 @ w.T + (0 if b is None else b) + s * ((t2 * keep) @ a.T) @ bb.T).reshape(*t.shape[:-1], -1)

    qkv = lora(x, base.in_proj_weight, base.in_proj_bias, layer.lora_A, layer.lora_B, seeds[0])
    q, k, v = (t.reshape(L, N * H, d).transpose(0, 1) for t in qkv.split(E, dim=-1))
    att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v
    att = att.transpose(0, 1).reshape(L, N, E)
    o = base.out_proj
    return lora(att, o.weight, o.bias, layer.out_lora_A, layer.out_lora_B, seeds[1])


@pytest.mark.parametrize("bf", [False, True])
def test_lora_dropout_against_explicit_masks(bf):
    p = 0.4
    layer = make(batch_first=bf, dropout=p).train()
    q, _, _ = inputs(bf)
    torch.manual_seed(11)
    seeds = [int(torch.randint(0, 2**62, (), dtype=torch.int64)) for _ in range(2)]
    torch.manual_seed(11)
    got, _ = layer(q, q, q, need_weights=False)
    x = q.transpose(0, 1) if bf else q
    want = explicit(layer, x, seeds, p)
    want = want.transpose(0, 1) if bf else want
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(got)
    ps = [layer.lora_A, layer.lora_B, layer.out_lora_A, layer.out_lora_B, q]
    for a, b in zip(torch.autograd.grad(got, ps, g), torch.autograd.grad(want, ps, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(got, layer.eval()(q, q, q, need_weights=False)[0])  # dropout did something


def test_gradcheck_with_dropout_and_masks():
    layer = make(E=8, heads=2, r=2, dropout=0.25, batch_first=True, add_bias_kv=True)
    q, k, _ = inputs(True, L=3, S=4, E=8)
    pad = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)

    def f(q, k, a, b, ao, bo):
        torch.manual_seed(0)  # the same dropout masks at every evaluation
        params = {"lora_A": a, "lora_B": b, "out_lora_A": ao, "out_lora_B": bo}
        y, w = functional_call(layer, params, (q, k, k), dict(key_padding_mask=pad, average_attn_weights=False))
        return y, w

    ins = (q, k, layer.lora_A, layer.lora_B, layer.out_lora_A, layer.out_lora_B)
    assert torch.autograd.gradcheck(f, ins)


def test_merge_unmerge_and_unload():
    layer = make(batch_first=True).eval()
    q, k, _ = inputs(True)
    want = layer(q, k, k)[0].detach()
    w_in, w_out = layer.base.in_proj_weight.clone(), layer.base.out_proj.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(q, k, k)[0], want, rtol=1e-10, atol=1e-10)
    layer.unmerge()
    torch.testing.assert_close(layer.base.in_proj_weight, w_in, rtol=0, atol=1e-14)
    torch.testing.assert_close(layer.base.out_proj.weight, w_out, rtol=0, atol=1e-14)
    model = nn.ModuleDict({"attn": layer})
    ftk.unload_lora(model, merge=True)
    assert type(model["attn"]) is nn.MultiheadAttention and not model["attn"]._forward_pre_hooks
    torch.testing.assert_close(model["attn"](q, k, k)[0], want, rtol=1e-10, atol=1e-10)


class AttnModel(nn.Module):
    """A tiny classifier around one nn.MultiheadAttention (a ViT block's shape)."""

    def __init__(self, E=16, heads=4, bf=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, heads, batch_first=bf)
        self.mlp = nn.Linear(E, E)
        self.head = nn.Linear(E, 3)

    def forward(self, x, need_weights=False):
        y = x + self.attn(x, x, x, need_weights=need_weights)[0]
        return self.head(torch.relu(self.mlp(y)).mean(1))


def peft_pair(bias="none", r=4, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AttnModel().double()
    cfg = LoraConfig(target_modules=["attn", "mlp"], r=r, lora_alpha=8, init_lora_weights=False, bias=bias)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    return peft_model, cfg


def peft_equivalent(model):
    """``model`` (ours) with out_lora_B scaled to what the installed PEFT computes for the same file:
    doubled where PEFT adds the out_proj delta twice (huggingface/peft#3774)."""
    twin = copy.deepcopy(model)
    if peft_doubles_out_proj():
        with torch.no_grad():
            for m in lora_modules(twin).values():
                if isinstance(m, LoRAMultiheadAttention):
                    m.out_lora_B.mul_(2)
    return twin


def test_installed_peft_doubling_is_detected():
    """The probe agrees with PEFT's source: its merge writes W + dW into out_proj's weight and then
    calls out_proj.merge(), which adds dW again."""
    import inspect

    from peft.tuners.lora.layer import MultiheadAttention as PeftMHA

    src = inspect.getsource(PeftMHA.merge)
    assert peft_doubles_out_proj() == ("out_proj.get_base_layer().weight = " in src)


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_from_peft_matches_peft(bias):
    peft_model, _ = peft_pair(bias)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    trained = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)
    with _peft_warning():
        ours = ftk.from_peft(copy.deepcopy(peft_model))
    assert isinstance(ours.attn, LoRAMultiheadAttention)
    assert type(ours.attn.base.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert all("lora" not in n for n, _ in ours.attn.base.named_parameters())  # PEFT's nested layer is gone
    # LoRA's function: torch's layer on W + s B A and W_o + s B_o A_o
    got = ours(x)
    torch.testing.assert_close(ours.attn(x, x, x)[0], reference(ours.attn, x, x, x)[0], rtol=1e-10, atol=1e-12)
    # PEFT's (out delta doubled while its bug stands): same outputs and gradients
    twin = peft_equivalent(ours)
    want = peft_model(x)
    torch.testing.assert_close(twin(x), want, rtol=1e-10, atol=1e-12)
    ours_trained = sorted(n for n, p in twin.named_parameters() if p.requires_grad)
    assert len(ours_trained) == len(trained)
    g_ours = dict(
        zip(
            ours_trained,
            torch.autograd.grad(twin(x).square().sum(), [dict(twin.named_parameters())[n] for n in ours_trained]),
        )
    )
    g_peft = dict(
        zip(
            trained, torch.autograd.grad(want.square().sum(), [dict(peft_model.named_parameters())[n] for n in trained])
        )
    )
    names = {  # ours -> PEFT's
        "attn.lora_A": "base_model.model.attn.lora_A.default.weight",
        "attn.lora_B": "base_model.model.attn.lora_B.default.weight",
        "attn.out_lora_A": "base_model.model.attn.base_layer.out_proj.lora_A.default.weight",
        "mlp.lora_A": "base_model.model.mlp.lora_A.default.weight",
        "mlp.lora_B": "base_model.model.mlp.lora_B.default.weight",
        "attn.base.out_proj.bias": "base_model.model.attn.base_layer.out_proj.base_layer.bias",
        "mlp.base.bias": "base_model.model.mlp.base_layer.bias",
    }
    names["attn.out_lora_B"] = "base_model.model.attn.base_layer.out_proj.lora_B.default.weight"
    # PEFT's second out_proj delta is added through .data: its gradient flows through one delta only,
    # so for A_o it is half the doubled twin's (B_o's is the same: the twin's B_o is 2 B_o)
    half = {"attn.out_lora_A": 2.0 if peft_doubles_out_proj() else 1.0}
    for n, g in g_ours.items():
        if n in names:
            torch.testing.assert_close(g, half.get(n, 1.0) * g_peft[names[n]], rtol=1e-9, atol=1e-12, msg=n)
    del got
    if bias == "lora_only":
        assert ours.attn.base.out_proj.bias.requires_grad and not ours.attn.base.in_proj_bias.requires_grad


def _peft_warning():
    """Expect the conversion warning where the installed PEFT doubles the out_proj delta."""
    if peft_doubles_out_proj():
        return pytest.warns(UserWarning, match="twice")
    return contextlib.nullcontext()


def test_adapter_files_both_ways(tmp_path):
    from peft import PeftModel

    peft_model, _ = peft_pair("lora_only")
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    peft_model.save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    fresh = AttnModel().double()
    with _peft_warning():
        ftk.load_adapter(fresh, str(tmp_path / "peft"))
    assert isinstance(fresh.attn, LoRAMultiheadAttention)
    torch.testing.assert_close(peft_equivalent(fresh)(x), peft_model(x), rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # train a little: new values go out and come back
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    ftk.save_adapter(fresh, str(tmp_path / "ours"))
    torch.manual_seed(0)
    back = PeftModel.from_pretrained(AttnModel().double(), str(tmp_path / "ours"))
    torch.testing.assert_close(back(x), peft_equivalent(fresh)(x), rtol=1e-10, atol=1e-12)
    torch.manual_seed(0)
    with _peft_warning():
        again = ftk.load_adapter(AttnModel().double(), str(tmp_path / "ours"))
    torch.testing.assert_close(again(x), fresh(x), rtol=1e-12, atol=1e-12)


def test_apply_lora_trains_only_the_adapters_and_merges_into_the_weights():
    torch.manual_seed(0)
    model = AttnModel().double()
    ftk.apply_lora(model, ["attn", "mlp"], r=4, alpha=8)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"attn.lora_A", "attn.lora_B", "attn.out_lora_A", "attn.out_lora_B", "mlp.lora_A", "mlp.lora_B"}
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    # B = 0: the adapted model starts as the base
    torch.testing.assert_close(model(x), ftk.unload_lora(copy.deepcopy(model), merge=False)(x), rtol=0, atol=1e-14)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)
    want = model(x)
    layer = model.attn
    w_in = layer.base.in_proj_weight + layer.scaling * layer.lora_B @ layer.lora_A
    w_out = layer.base.out_proj.weight + layer.scaling * layer.out_lora_B @ layer.out_lora_A
    ftk.unload_lora(model, merge=True)
    assert type(model.attn) is nn.MultiheadAttention
    torch.testing.assert_close(model.attn.in_proj_weight, w_in, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.attn.out_proj.weight, w_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-12)


def test_in_an_encoder_with_the_fast_paths():
    """Inside nn.TransformerEncoder, eval inference with a padding mask (torch would pack it into a
    NestedTensor and run its fused kernel on the base weights) gives the adapted model."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).double()
    ftk.apply_lora(model, ["self_attn", "linear1"], r=3)
    assert len(lora_modules(model)) == 4
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    model.eval()
    ref = ftk.unload_lora(copy.deepcopy(model), merge=True).eval()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    with torch.no_grad():
        got, want = model(x, src_key_padding_mask=pad), ref(x, src_key_padding_mask=pad)
        torch.testing.assert_close(got[~pad], want[~pad], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-10, atol=1e-10)


def test_low_precision_against_float64():
    layer64 = make(batch_first=True)
    q, _, _ = inputs(True)
    want = layer64(q, q, q, need_weights=False)[0].detach()
    bf = copy.deepcopy(layer64)
    bf.base.to(torch.bfloat16)
    with torch.no_grad():  # fp32 adapters on a bf16 base, as apply_lora makes them
        for name in ("lora_A", "lora_B", "out_lora_A", "out_lora_B"):
            setattr(bf, name, nn.Parameter(getattr(bf, name).float()))
    got = bf(q.bfloat16(), q.bfloat16(), q.bfloat16(), need_weights=False)[0]
    assert got.dtype == torch.bfloat16
    assert (got.double() - want).abs().max() <= 0.05 * want.abs().max()
    f32 = copy.deepcopy(layer64).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_ac = f32(q.float(), q.float(), q.float(), need_weights=False)[0]
    assert got_ac.dtype == torch.bfloat16
    assert (got_ac.double() - want).abs().max() <= 0.05 * want.abs().max()


def test_compiles_without_graph_breaks():
    layer = make(batch_first=True)
    q, k, _ = inputs(True)
    want = layer(q, k, k, need_weights=False)[0]
    got = torch.compile(layer, backend="aot_eager", fullgraph=True)(q, k, k, need_weights=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_bad_input():
    with pytest.raises(NotImplementedError, match="kdim"):
        LoRAMultiheadAttention(nn.MultiheadAttention(16, 4, kdim=8, vdim=8))
    with pytest.raises(NotImplementedError, match="DoRA"):
        LoRAMultiheadAttention(nn.MultiheadAttention(16, 4), dora=True)
    with pytest.raises(TypeError, match="wraps an nn.MultiheadAttention"):
        LoRAMultiheadAttention(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="r must be"):
        LoRAMultiheadAttention(nn.MultiheadAttention(16, 4), r=0)
    layer = make()
    q, _, _ = inputs(False)
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer(q, q, q, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="attn_mask"):
        layer(q, q, q, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="float64|dtype|match"):
        layer(q.float(), q.float(), q.float())
    with pytest.raises(RuntimeError, match="is_causal"):
        layer(q, q, q, is_causal=True)
    model = nn.ModuleDict({"a": nn.MultiheadAttention(16, 4)})
    with pytest.raises(NotImplementedError, match="DoRA"):
        ftk.apply_lora(model, ["a"], use_dora=True)
    assert type(model["a"]) is nn.MultiheadAttention and model["a"].in_proj_weight.requires_grad


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_against_float64_cpu(dtype):
    layer64 = make(batch_first=True)
    q, _, _ = inputs(True)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    want = layer64(q, q, q, key_padding_mask=pad, need_weights=False)[0].detach()
    cu = copy.deepcopy(layer64).cuda()
    cu.base.to(dtype)
    if dtype == torch.float32:
        cu.float()
    else:
        cu.lora_A.data, cu.lora_B.data = cu.lora_A.data.float(), cu.lora_B.data.float()
        cu.out_lora_A.data, cu.out_lora_B.data = cu.out_lora_A.data.float(), cu.out_lora_B.data.float()
    x = q.detach().cuda().to(dtype)
    got = cu(x, x, x, key_padding_mask=pad.cuda(), need_weights=False)[0]
    tol = 2e-3 if dtype == torch.float32 else 0.05
    assert (got.double().cpu() - want).abs().max() <= tol * want.abs().max()
    got.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in cu.parameters(recurse=False))
