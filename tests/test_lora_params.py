"""LoRA on module parameters (PEFT's target_parameters): the stacked experts and routers of
transformers-v5 mixture-of-experts models, against PEFT's lora.ParamWrapper and plain PyTorch."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import ftkernels as ftk
from ftkernels.nn import LoRAParams
from ftkernels.peft_compat import _adapter_entries, lora_modules

peft = pytest.importorskip("peft")
tf = pytest.importorskip("transformers")

SMALL = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=100, head_dim=8,
)  # fmt: skip
# name -> (config class, extra config, target_parameters for PEFT and apply_lora; None: PEFT's own
# conversion of "all-linear" picks them)
ARCHS = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), None),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24), None),
    # transposed [E, in, out] stacks with biases and an interleaved, clamped gate
    "gpt_oss": (
        "GptOssConfig",
        dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"] * 2),
        ["experts.gate_up_proj", "experts.down_proj", "router.weight"],
    ),
    # shared experts: plain Linears named gate_proj / up_proj / down_proj beside the stacked experts
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            n_shared_experts=1,
            first_k_dense_replace=0,
            n_group=1,
            topk_group=1,
        ),
        None,
    ),  # fmt: skip
    # no gate: up_proj [E, I, H] and an activation
    "nemotron_h": (
        "NemotronHConfig",
        dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, hybrid_override_pattern="E*"),
        ["experts.up_proj", "experts.down_proj"],
    ),
}


def _model(arch: str, seed: int = 0) -> nn.Module:
    cls, extra, _ = ARCHS[arch]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.AutoModelForCausalLM.from_config(getattr(tf, cls)(**SMALL, **extra)).double()
    # transformers' batched_mm: its grouped_mm refuses fp64 on CPU, and some eager loops (NemotronH's)
    # accumulate in the routing weights' fp32
    model.set_experts_implementation("batched_mm")
    return model


def _peft(model: nn.Module, arch: str, **kw) -> nn.Module:
    tp = ARCHS[arch][2]
    targets = dict(target_modules="all-linear") if tp is None else dict(target_modules=["q_proj"], target_parameters=tp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **targets, **kw))
    torch.manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_B" in n:  # PEFT starts B at zero: the adapters would do nothing
            nn.init.normal_(p.data, std=0.3)
    return pm


def _peft_name(key: str) -> str:
    """An adapter-file key -> the PEFT model's parameter name (adapter "default")."""
    stem, _, leaf = key.rpartition(".")
    return f"{stem}.default.{leaf}"


def _fresh_routing(tokens: int, experts: int, k: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    return index, torch.rand(tokens, k, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_from_peft_matches_peft(arch):
    """Outputs and every adapter's gradient equal PEFT's ParamWrapper (which folds W + s B A into a copy
    of the stack): the experts take the fused path, routers PEFT's own math."""
    pm = _peft(_model(arch), arch)
    twin = copy.deepcopy(pm)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(2))
    ref = twin(input_ids=ids).logits
    ours = ftk.from_peft(pm)
    layers = {n: m for n, m in lora_modules(ours).items() if isinstance(m, LoRAParams)}
    assert layers and any(m._fused() for m in layers.values())
    got = ours(input_ids=ids).logits
    base = _model(arch)(input_ids=ids).logits
    assert (ref - base).abs().max() > 0.1  # the adapters change the outputs
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    ref.square().mean().backward()
    got.square().mean().backward()
    grads = dict(twin.named_parameters())
    for name, layer in layers.items():
        for key, (owner, attr) in _adapter_entries(name, layer).items():
            want = grads[_peft_name(key)].grad
            assert want.abs().max() > 0
            torch.testing.assert_close(getattr(owner, attr).grad, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "glm4_moe"])
def test_all_linear_adapts_what_peft_adapts(arch):
    """apply_lora("all-linear") on a v5 MoE model adapts what PEFT's conversion does: the attention
    projections, the stacked experts (gate_up_proj with twice r and alpha) and the router, with PEFT's
    init; the same number of trainable parameters in the same shapes, and the model starts as its base.
    PEFT moves the v4 expert names off the module targets, so a shared expert's gate_proj / up_proj /
    down_proj get no adapter (glm4_moe; before, they had one here, and an adapter saved here lost them
    under PEFT: 0.36 off)."""
    model = _model(arch)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 7))
    base = model(input_ids=ids).logits
    pm = _peft(_model(arch), arch)
    ours = ftk.apply_lora(model, "all-linear", r=4, alpha=8)
    torch.testing.assert_close(ours(input_ids=ids).logits, base)
    theirs = {n: tuple(p.shape) for n, p in pm.named_parameters() if p.requires_grad}
    mine = {}
    for name, layer in lora_modules(ours).items():
        for key, (owner, attr) in _adapter_entries(name, layer).items():
            mine[_peft_name(key)] = tuple(getattr(owner, attr).shape)
    assert mine == theirs
    experts = next(m for m in lora_modules(ours).values() if isinstance(m, LoRAParams) and m._fused())
    gu = experts.adapters["gate_up_proj"]
    assert (gu.r, gu.alpha, experts.adapters["down_proj"].r) == (8, 16, 4)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == sum(
        p.numel() for p in pm.parameters() if p.requires_grad
    )
    assert all(not p.requires_grad for p in experts.base.parameters())


def _standalone_experts(arch: str) -> nn.Module:
    """The first experts module of a small model of ``arch``."""
    return next(m for n, m in _model(arch).named_modules() if n.endswith(".experts"))


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "nemotron_h"])
def test_experts_path_equals_the_folded_weights(arch):
    """The fused experts path equals the module's own forward on W + s B A (float64), outputs and the
    gradients of A, B, the tokens and the routing weights, on fresh random routing with odd sizes."""
    experts = _standalone_experts(arch)
    names = [n for n in ("gate_up_proj", "up_proj", "down_proj") if hasattr(experts, n)]
    layer = LoRAParams(experts, {names[0]: (3, 5.0), names[1]: (2, 7.0)})
    for a in layer.adapters.values():
        nn.init.normal_(a.lora_B)
    x = torch.randn(13, SMALL["hidden_size"], dtype=torch.float64, requires_grad=True)
    index, weights = _fresh_routing(13, experts.num_experts, 2)
    weights.requires_grad_(True)
    got = layer(x, index, weights)
    own = dict(experts.named_parameters(recurse=False))
    folded = {n: own[n] + a.delta() for n, a in layer.adapters.items()}
    want = torch.func.functional_call(experts, folded, (x, index, weights))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    params = [x, weights, *(p for a in layer.adapters.values() for p in (a.lora_A, a.lora_B))]
    dg = torch.autograd.grad(got, params, g)
    dw = torch.autograd.grad(want, params, g)
    for a, b in zip(dg, dw, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_experts_path():
    experts = _standalone_experts("mixtral")
    layer = LoRAParams(experts, ["gate_up_proj", "down_proj"], r=2, alpha=3)
    for a in layer.adapters.values():
        nn.init.normal_(a.lora_B)
    x = torch.randn(5, SMALL["hidden_size"], dtype=torch.float64, requires_grad=True)
    index, weights = _fresh_routing(5, experts.num_experts, 2)
    a = layer.adapters["gate_up_proj"]
    assert torch.autograd.gradcheck(lambda x, A, B: layer(x, index, weights), (x, a.lora_A, a.lora_B))


def test_experts_path_skips_experts_without_tokens_and_the_frozen_stack():
    """Experts no token picks cost nothing and get zero adapter gradient; the frozen stack gets no .grad."""
    experts = _standalone_experts("mixtral")
    layer = LoRAParams(experts, ["gate_up_proj", "down_proj"], r=2)
    x = torch.randn(6, SMALL["hidden_size"], dtype=torch.float64)
    index = torch.tensor([[0, 2]] * 6)  # experts 1 and 3 idle
    weights = torch.rand(6, 2, dtype=torch.float64)
    layer(x, index, weights).sum().backward()
    a = layer.adapters["down_proj"]
    per_expert = a.lora_B.grad.view(a.lora_B.shape[0], -1, 4)  # [out, r, E]
    assert per_expert[:, :, [1, 3]].abs().max() == 0 and per_expert[:, :, [0, 2]].abs().max() > 0
    assert all(p.grad is None for p in experts.parameters())
    with pytest.raises(ValueError, match="outside"):
        layer(x, torch.full((6, 2), 4), weights)


def test_bf16_stack_fp32_adapters():
    """A bf16 model: adapters are fp32 (PEFT's autocast_adapter_dtype), the output is bf16 and close to the
    float64 computation of the same weights."""
    experts = _standalone_experts("mixtral")
    ref_layer = LoRAParams(experts, ["gate_up_proj", "down_proj"], r=4)
    for a in ref_layer.adapters.values():
        nn.init.normal_(a.lora_B, std=0.2)
    low = copy.deepcopy(ref_layer)
    low.base.to(torch.bfloat16)
    with torch.no_grad():  # the reference sees the rounded stack too
        for n, p in ref_layer.base.named_parameters():
            p.copy_(dict(low.base.named_parameters())[n].double())
    assert {a.lora_A.dtype for a in low.adapters.values()} == {torch.float64}  # made over fp64, kept as is
    for a in low.adapters.values():
        a.float()
    x = torch.randn(9, SMALL["hidden_size"], dtype=torch.float64)
    index, weights = _fresh_routing(9, 4, 2)
    got = low(x.bfloat16(), index, weights.bfloat16())
    want = ref_layer(x.bfloat16().double(), index, weights.bfloat16().double())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2)


def test_adapter_files_both_ways(tmp_path):
    """save_adapter writes PEFT's nested ParamWrapper keys, target_parameters and the doubled rank of the
    fused gate_up_proj (PeftModel.from_pretrained reads it, same outputs); load_adapter reads PEFT's."""
    pm = _peft(_model("mixtral"), "mixtral")
    pm.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, SMALL["vocab_size"], (2, 7))
    want = pm(input_ids=ids).logits
    ours = ftk.load_adapter(_model("mixtral"), str(tmp_path / "peft"))
    torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # train a little, so the file carries new values
        for layer in lora_modules(ours).values():
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
    trained = ours(input_ids=ids).logits
    ftk.save_adapter(ours, str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(_model("mixtral"), str(tmp_path / "ours"))
    torch.testing.assert_close(back(input_ids=ids).logits, trained, rtol=1e-10, atol=1e-10)
    again = ftk.load_adapter(_model("mixtral"), str(tmp_path / "ours"))
    torch.testing.assert_close(again(input_ids=ids).logits, trained, rtol=1e-12, atol=1e-12)
    gu = next(m for m in lora_modules(again).values() if isinstance(m, LoRAParams) and m._fused()).adapters
    assert (gu["gate_up_proj"].r, gu["gate_up_proj"].alpha, gu["down_proj"].r) == (8, 16, 4)


def test_merge_unmerge_unload():
    model = ftk.from_peft(_peft(_model("gpt_oss"), "gpt_oss"))
    ids = torch.randint(0, SMALL["vocab_size"], (2, 7))
    want = model(input_ids=ids).logits
    stack = next(m for m in lora_modules(model).values() if isinstance(m, LoRAParams) and m._fused())
    before = stack.base.gate_up_proj.detach().clone()
    ftk.merge_lora(model)
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-10, atol=1e-10)
    ftk.unmerge_lora(model)
    torch.testing.assert_close(stack.base.gate_up_proj, before, rtol=0, atol=1e-13)
    ftk.unload_lora(model)
    assert not lora_modules(model) and type(model.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-10, atol=1e-10)


def test_delta_layout_is_peft():
    """ParamAdapter.delta equals PEFT's ParamWrapper.get_delta_weight (both stack orders, and 2-D)."""
    pm = _peft(_model("gpt_oss"), "gpt_oss")
    mix = _peft(_model("mixtral"), "mixtral")
    wrappers = [m for m in [*pm.modules(), *mix.modules()] if type(m).__name__ == "ParamWrapper"]
    assert {w.parameter_name for w in wrappers} >= {"gate_up_proj", "down_proj", "weight"}
    for w in wrappers:
        ours = LoRAParams.from_peft_layer(w).adapters[w.parameter_name]
        torch.testing.assert_close(ours.delta(), w.get_delta_weight("default"), rtol=1e-12, atol=1e-14)


def test_bad_input():
    model = _model("mixtral")
    with pytest.raises(ValueError, match="take no LoRA dropout"):
        ftk.apply_lora(model, "all-linear", dropout=0.1)
    with pytest.raises(ValueError, match="matches no parameter"):
        ftk.apply_lora(model, ["q_proj"], target_parameters=["no_such_param"])
    with pytest.raises(ValueError, match="both as a module"):
        ftk.apply_lora(model, ["gate"], target_parameters=["gate.weight"])
    assert not lora_modules(model)
    experts = _standalone_experts("mixtral")
    with pytest.raises(ValueError, match="no parameter 'w1'"):
        LoRAParams(experts, ["w1"])
    with pytest.raises(ValueError, match="r must be"):
        LoRAParams(experts, ["down_proj"], r=0)
    norm = nn.LayerNorm(4)
    with pytest.raises(ValueError, match="1-D"):
        LoRAParams(norm, ["weight"])
    with pytest.raises(ValueError, match="model itself"):
        ftk.apply_lora(nn.Linear(3, 3), [], target_parameters=["weight"])
    layer = LoRAParams(experts, ["down_proj"])
    with pytest.raises(TypeError, match="LoRA layer already"):
        LoRAParams(layer, ["down_proj"])
    with pytest.raises(TypeError, match="takes"):
        layer(torch.randn(2, SMALL["hidden_size"], dtype=torch.float64))


def test_target_parameters_empty_keeps_the_experts_frozen():
    """target_parameters=[] opts out of PEFT's MoE conversion: only the modules are adapted (and dropout
    is then allowed)."""
    model = ftk.apply_lora(_model("mixtral"), "all-linear", r=4, dropout=0.1, target_parameters=[])
    assert not any(isinstance(m, LoRAParams) for m in lora_modules(model).values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".experts." in n)


def test_generic_parameter_of_a_custom_module():
    """Any module's 2-D parameter: its own forward runs on W + s B A (here a module that reads its
    weight itself, as a router does)."""

    class Scorer(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 7, dtype=torch.float64))

        def forward(self, x):
            return torch.softmax(x @ self.weight.t(), -1)

    holder = nn.Sequential(Scorer())
    ftk.apply_lora(holder, [], target_parameters=["0.weight"], r=3, alpha=6)
    layer = holder[0]
    nn.init.normal_(layer.adapters["weight"].lora_B)
    x = torch.randn(4, 7, dtype=torch.float64)
    a = layer.adapters["weight"]
    want = torch.softmax(x @ (layer.base.weight + 2.0 * a.lora_B @ a.lora_A).t(), -1)
    torch.testing.assert_close(holder(x), want)
    assert torch.autograd.gradcheck(lambda A: layer(x), (a.lora_A,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_experts_path_cuda_bf16():
    """On the GPU (bf16 stack, fp32 adapters) the experts path agrees with the float64 CPU computation."""
    experts = _standalone_experts("mixtral")
    ref = LoRAParams(experts, ["gate_up_proj", "down_proj"], r=4)
    for a in ref.adapters.values():
        nn.init.normal_(a.lora_B, std=0.2)
    dev = copy.deepcopy(ref).cuda()
    dev.base.to(torch.bfloat16)
    for a in dev.adapters.values():
        a.float()
    with torch.no_grad():
        for n, p in ref.base.named_parameters():
            p.copy_(dict(dev.base.named_parameters())[n].double().cpu())
    x = torch.randn(33, SMALL["hidden_size"], dtype=torch.float64)
    index, weights = _fresh_routing(33, 4, 2)
    got = dev(x.cuda().bfloat16(), index.cuda(), weights.cuda().bfloat16())
    want = ref(x.bfloat16().double(), index, weights.bfloat16().double())
    torch.testing.assert_close(got.double().cpu(), want, rtol=3e-2, atol=3e-2)
    got.float().square().sum().backward()
    assert all(a.lora_A.grad is not None and a.lora_A.grad.isfinite().all() for a in dev.adapters.values())


def test_saved_moe_adapter_loads_in_peft_or_warns(tmp_path):
    """On a model with shared experts (glm4_moe): an "all-linear" adapter trained here loads into PEFT
    with the same outputs. With the experts left out (target_parameters=[]) the shared experts' Linears
    are adapted, which PEFT's loader would move onto the stacked experts: save_adapter says so, and
    load_adapter still reads the file exactly."""
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    for tp, warns in ((None, False), ([], True)):
        model = ftk.apply_lora(_model("glm4_moe"), "all-linear", r=4, alpha=8, target_parameters=tp)
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                nn.init.normal_(p.data, std=0.3)
        ref = model(input_ids=ids).logits
        path = str(tmp_path / f"tp{tp}")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ftk.save_adapter(model, path)
        said = [str(w.message) for w in seen if "experts when it loads" in str(w.message)]
        assert bool(said) == warns, said
        if warns:
            assert "shared_experts" in said[0] and "6 LoRA layer(s)" in said[0]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                back = peft.PeftModel.from_pretrained(_model("glm4_moe"), path)
            torch.testing.assert_close(back(input_ids=ids).logits, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ftk.load_adapter(_model("glm4_moe"), path)(input_ids=ids).logits, ref)


def test_conversion_naming_absent_parameters_is_not_an_error():
    """PEFT's v5 conversion maps the v4 names by model type, whether or not the model has the stacked
    parameters (transformers' Beam MoE keeps its own layout): apply_lora, like PEFT, adapts the modules
    that match and raises only for target_parameters the caller named (before, the conversion's own
    names raised)."""
    from types import SimpleNamespace

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(model_type="qwen3_moe")
            self.q_proj, self.router = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.q_proj(x) + self.router(x).sum(-1, keepdim=True)

    model = ftk.apply_lora(Block(), ["q_proj", "gate"], r=2)
    assert set(lora_modules(model)) == {"q_proj"}
    with pytest.raises(ValueError, match=r"target_parameters=\['gate.weight'\] matches no parameter"):
        ftk.apply_lora(Block(), ["q_proj"], r=2, target_parameters=["gate.weight"])


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_per_example_grads_under_vmap_with_batched_routing(impl):
    """torch.func transforms take the module's own forward on W + s B A (the experts path splits tokens
    by a host-side count, which vmap cannot batch; it failed there): per-example gradients with routing
    that differs per example equal a loop of single grads, and the eager path's gradient."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    experts = _standalone_experts("mixtral").float()
    experts.config._experts_implementation = impl
    layer = LoRAParams(experts, ["gate_up_proj", "down_proj"], r=2)
    for a in layer.adapters.values():
        nn.init.normal_(a.lora_B)
    x = torch.randn(4, 5, SMALL["hidden_size"])
    index = torch.stack([_fresh_routing(5, experts.num_experts, 2, torch.float32, seed=s)[0] for s in range(4)])
    weights = torch.rand(4, 5, 2)
    params = {n: p.detach() for n, p in layer.named_parameters() if p.requires_grad}

    def loss(p, xi, ii, wi):
        return functional_call(layer, p, (xi, ii, wi)).square().sum()

    batched = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, index, weights)
    for i in range(4):
        one = grad(loss)(params, x[i], index[i], weights[i])
        layer.zero_grad()
        layer(x[i], index[i], weights[i]).square().sum().backward()  # the fused experts path
        for k in params:
            torch.testing.assert_close(batched[k][i], one[k], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(batched[k][i], layer.get_parameter(k).grad, rtol=1e-3, atol=1e-3)
