"""LoRA inputs rebuilt in backward from what their producers keep (ftkernels/ops/input_recompute.py):
the rebuild against the forward's tensor per producer, the cases that must fall back to saving x,
gradients against the saved-input path, and the memory it saves against the frozen floor."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import ftkernels as ftk
from ftkernels.bench.common import cpu_peak_extra_mb
from ftkernels.ops import input_recompute as ir

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def _rms(h, w, eps=1e-6):
    """HF LlamaRMSNorm: fp32 statistics, cast back, weight times the cast."""
    hf = h.to(torch.float32)
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return w * hf.to(h.dtype)


def _producers(device, dtype):
    """name -> (x from a fresh h that needs grad, the plan's top node, whether the rebuild is exact)."""
    K = 24
    h = torch.randn(5, 7, K, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(5, 7, K, device=device, dtype=dtype, requires_grad=True)
    col = torch.randn(5, 7, 1, device=device, dtype=dtype, requires_grad=True)
    ln = nn.LayerNorm(K, device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    bare = nn.LayerNorm(K, elementwise_affine=False, device=device, dtype=dtype)
    w = torch.randn(K, device=device, dtype=dtype)
    wide = torch.float64 if dtype == torch.float32 else torch.float32
    return {
        "gelu": (lambda: F.gelu(h), "gelu", True),
        "gelu tanh": (lambda: F.gelu(h, approximate="tanh"), "gelu", True),
        "silu": (lambda: F.silu(h), "silu", True),
        "relu": (lambda: torch.relu(h), "t", True),
        "swiglu product": (lambda: F.silu(g) * h, "mul", True),
        "broadcast product": (lambda: h * col, "mul", True),
        "layer_norm": (lambda: ln(h), "layer_norm", False),
        "layer_norm, no affine": (lambda: bare(h), "layer_norm", False),
        "rms_norm (weight * cast)": (lambda: _rms(h, w), "mul", True),
        "cast of a gelu": (lambda: F.gelu(h).to(wide), "to", True),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", list(_producers("cpu", torch.float32)))
def test_rebuild_equals_forward(name, dtype, device):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("fp64 LoRA layers are CPU only")
    make, top, exact = _producers(device, dtype)[name]
    x = make()
    p = ir.plan(x)
    if name.startswith("layer_norm") and dtype == torch.bfloat16 and device == "cpu":
        assert p is None  # CPU keeps bf16 statistics for bf16 inputs: too coarse to rebuild from
        return
    assert p is not None and p.spec[0] == top
    got = ir.rebuild(p)
    assert got.shape == x.shape and got.dtype == x.dtype and got.device == x.device
    assert not got.requires_grad
    if exact:
        assert torch.equal(got, x.detach())
    else:  # LayerNorm from its statistics: 1-2 ulp of x's dtype
        ulp = torch.finfo(dtype).eps * x.detach().abs().clamp_min(1)
        assert ((got - x.detach()).abs() <= 2 * ulp).all()


def test_plan_refuses_what_it_cannot_rebuild():
    h = torch.randn(6, 8, requires_grad=True)
    assert ir.plan(h) is None  # a leaf
    assert ir.plan(torch.randn(6, 8)) is None  # no graph
    assert ir.plan(h + 1) is None  # add keeps nothing
    assert ir.plan(h * 2.0) is None  # the product keeps only the scalar; h is a leaf, not rebuilt
    assert ir.plan(F.gelu(h).to("meta")) is None  # a device move
    x = F.gelu(h.clone())
    x.grad_fn._saved_self.add_(1)  # the kept input modified in place: autograd refuses to unpack it
    assert ir.plan(x) is None
    x = F.gelu(h)
    with ir.enabled(False):
        assert ir.plan(x) is None
    assert ir.plan(x) is not None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert ir.plan(x) is None  # checkpointing and offloading own the saved tensors


def test_environment_turns_it_off():
    code = "from ftkernels.ops import input_recompute as ir; print(ir.is_enabled())"
    env = dict(os.environ, FTKERNELS_RECOMPUTE_INPUT="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class _Block(nn.Module):
    """LayerNorm -> q/k/v (one shared-input group), GELU MLP, SwiGLU MLP with an RMSNorm: every
    producer the plans cover, on real LoRA layers."""

    def __init__(self, d=32, f=48, dtype=torch.float64):
        super().__init__()
        lin = lambda i, o: nn.Linear(i, o, dtype=dtype)  # noqa: E731
        self.ln = nn.LayerNorm(d, dtype=dtype)
        self.q, self.k, self.v = lin(d, d), lin(d, d), lin(d, d)
        self.up, self.down = lin(d, f), lin(f, d)
        self.norm_w = nn.Parameter(torch.randn(d, dtype=dtype))
        self.mlp = nn.Module()  # its own parent, as in Llama: gate/up2 form their own group
        self.mlp.gate, self.mlp.up2, self.mlp.down2 = lin(d, f), lin(d, f), lin(f, d)

    def forward(self, x):
        h = self.ln(x)
        a = self.q(h) + self.k(h) * self.v(h).tanh()
        m = self.down(F.gelu(self.up(a)))
        n = _rms(a + m, self.norm_w)
        return a + m + self.mlp.down2(F.silu(self.mlp.gate(n)) * self.mlp.up2(n))


def _lora_model(dtype, dropout):
    torch.manual_seed(0)
    model = nn.Sequential(_Block(dtype=dtype), _Block(dtype=dtype))
    names = ["q", "k", "v", "up", "down", "gate", "up2", "down2"]
    model = ftk.apply_lora(model, names, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)  # lora_B is zero at init: no gradient would reach lora_A
    return model


def _grads(model, x, flag):
    for p in model.parameters():
        p.grad = None
    x.grad = None
    with ir.enabled(flag):
        torch.manual_seed(7)  # the same dropout seeds in both runs
        model(x).pow(2).sum().backward()
    named = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return named | {"x": x.grad.clone()}


def _with_plans_seen(fn, monkeypatch):
    """``(fn(), the top node of each LoRA call's plan in call order, None where x is kept)``."""
    seen, orig = [], ir.plan
    monkeypatch.setattr(ir, "plan", lambda t: (lambda p: seen.append(None if p is None else p.spec[0]) or p)(orig(t)))
    out = fn()
    monkeypatch.setattr(ir, "plan", orig)
    return out, seen


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grads_match_the_saved_input_path(dtype, dropout, monkeypatch, lora_node):
    model = _lora_model(dtype, dropout)
    x = torch.randn(3, 11, 32, dtype=dtype, requires_grad=True)
    _grads(model, x, True)  # the groups learn their runs on the first call
    on, seen = _with_plans_seen(lambda: _grads(model, x, True), monkeypatch)
    off = _grads(model, x, False)
    # per block: q/k/v group (LayerNorm), up (tanh product: not kept), down (gelu), gate/up2 group
    # (RMSNorm: weight * cast), down2 (SwiGLU product)
    assert seen == ["layer_norm", None, "gelu", "mul", "mul"] * 2
    ln_fed = {f"{b}.{m}.lora_A" for b in (0, 1) for m in ("q", "k", "v")}
    for name, g in off.items():
        if name in ln_fed:  # only grad_A of LayerNorm-fed layers reads a rebuilt, rounded x
            tol = 1e-13 if dtype == torch.float64 else 2e-6
            torch.testing.assert_close(on[name], g, rtol=tol, atol=tol * g.abs().max().item())
        else:
            assert torch.equal(on[name], g), name


def test_in_place_change_of_x_after_the_layer(lora_node):
    """A saved x modified in place makes backward fail; a rebuilt one is the value the forward used."""
    torch.manual_seed(0)
    layer = ftk.nn.LoRALinear(nn.Linear(16, 12, dtype=torch.float64), r=4)
    nn.init.normal_(layer.lora_B)
    h = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)

    def run(flag, touch):
        layer.zero_grad(set_to_none=True)
        with ir.enabled(flag):
            x = F.gelu(h)
            y = layer(x)
            if touch:
                x.mul_(3)
            y.sum().backward()
        return layer.lora_A.grad.clone()

    clean = run(True, False)
    assert torch.equal(run(True, True), clean)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        run(False, True)


def test_checkpointed_block_is_unchanged(lora_node):
    model = _lora_model(torch.float64, 0.1)
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    ref = _grads(model, x, True)
    blocks = list(model)
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(7)
    y = x
    for b in blocks:
        y = checkpoint(b, y, use_reentrant=False)
    y.pow(2).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-12, atol=1e-12)


class _MLP(nn.Module):
    def __init__(self, d, f, depth):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(ln=nn.LayerNorm(d), fc1=nn.Linear(d, f), fc2=nn.Linear(f, d))) for _ in range(depth)
        )

    def forward(self, x):
        for b in self.blocks:
            x = x + b["fc2"](F.gelu(b["fc1"](b["ln"](x))))
        return x


def test_lora_step_memory_is_the_frozen_floors(lora_node):
    """The BERT pattern (LayerNorm -> fc1, GELU -> fc2), CPU allocator records: with inputs saved a
    LoRA step keeps every fc input on top of what the frozen model keeps; rebuilt, it keeps almost
    nothing more."""
    M, d, f, depth = 1024, 64, 256, 6
    torch.manual_seed(0)
    base = _MLP(d, f, depth)
    floor = _MLP(d, f, depth).requires_grad_(False)
    floor.load_state_dict(base.state_dict())
    model = ftk.apply_lora(base, ["fc1", "fc2"], r=8, dropout=0.1)
    x = torch.randn(M, d)
    xf = x.clone().requires_grad_(True)  # the floor: input gradients only

    def floor_step():
        floor(xf).sum().backward()

    def lora_step():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    peaks = {"floor": cpu_peak_extra_mb(floor_step), "on": cpu_peak_extra_mb(lora_step)}
    with ir.enabled(False):
        peaks["off"] = cpu_peak_extra_mb(lora_step)
    if None in peaks.values():
        pytest.skip("this torch's profiler does not expose allocation records")
    kept = depth * M * (d + f) * 4 / 2**20  # the fc inputs a LoRA step must keep: 7.5 MB
    assert peaks["off"] >= peaks["floor"] + 0.8 * kept, peaks
    assert peaks["on"] <= peaks["floor"] + 0.2 * kept, peaks  # at least 80% of them not kept


def _hf(kind):
    torch.manual_seed(0)
    if kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
        model, targets = BertForSequenceClassification(cfg), ["query", "key", "value", "dense"]
        ids = torch.randint(0, cfg.vocab_size, (3, 20))
        loss = lambda m: m(input_ids=ids, labels=torch.tensor([0, 1, 1])).loss  # noqa: E731
    elif kind == "gpt2":  # HF Conv1D layers (LoRAConv1D), NewGELU written as products
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=200, n_positions=32)
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
        model, targets = GPT2LMHeadModel(cfg), ["c_attn", "c_proj", "c_fc"]
        ids = torch.randint(0, cfg.vocab_size, (2, 16))
        loss = lambda m: m(input_ids=ids, labels=ids).loss  # noqa: E731
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=200, max_position_embeddings=32,
        )  # fmt: skip
        model = LlamaForCausalLM(cfg)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        ids = torch.randint(0, cfg.vocab_size, (2, 24))
        loss = lambda m: m(input_ids=ids, labels=ids).loss  # noqa: E731
    model = ftk.apply_lora(model, targets, r=4, alpha=8, dropout=0.1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    return model, loss


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_hf_models_plan_and_match(kind, monkeypatch, lora_node):
    """On HF BERT, Llama and GPT-2 the plans fire where the notes say (BERT: the
    LayerNorm-fed q/k/v group and intermediate.dense, GELU-fed output.dense; Llama: every
    RMSNorm-fed group and the SwiGLU-fed down_proj), and the step's grads match the saved path."""
    model, loss = _hf(kind)

    def grads(flag):
        model.zero_grad(set_to_none=True)
        with ir.enabled(flag):
            torch.manual_seed(3)
            loss(model).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    grads(True)  # the groups learn their runs
    on, seen = _with_plans_seen(lambda: grads(True), monkeypatch)
    off = grads(False)
    if kind == "bert":  # per layer: q/k/v group, attention.output.dense, intermediate, output; then pooler
        # layer 0's q/k/v read the embeddings' LayerNorm output, which has no graph (frozen, ids in)
        assert seen == [None, None, "layer_norm", "gelu", "layer_norm", None, "layer_norm", "gelu", None]
    elif kind == "llama":  # per layer: q/k/v group (RMSNorm), o_proj, gate/up group (RMSNorm), down_proj (SwiGLU)
        assert seen == [None, None, "mul", "mul"] + ["mul", None, "mul", "mul"]
    else:  # per layer: c_attn (ln_1), attention c_proj (merged heads), c_fc (ln_2), mlp c_proj (NewGELU)
        assert seen == [None, None, "layer_norm", "mul"] + ["layer_norm", None, "layer_norm", "mul"]
    for n, g in off.items():
        torch.testing.assert_close(on[n], g, rtol=2e-5, atol=1e-6 * g.abs().max().item())


def test_retain_graph_backward_twice(lora_node):
    """A rebuilt x is rebuilt again by a second backward through a retained graph."""
    model = _lora_model(torch.float64, 0.1)
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    _grads(model, x, True)  # groups learn
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(7)
    loss = model(x).pow(2).sum()
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
