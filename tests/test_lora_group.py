"""Shared-input LoRA groups (q/k/v as one autograd node): the group op against the layers run alone,
the learning and fallback rules of the module machinery, and real HF models."""

import copy
import pickle

import pytest
import torch
from helpers.lora import lora_members, lora_nodes
from torch import nn

import ftkernels as ftk
from ftkernels.nn import lora_group as lg
from ftkernels.nn.lora_linear import lora_linear
from ftkernels.ops.lora_group import lora_group_ys

CUDA = torch.cuda.is_available()


def _alone(x, members, scalings, ps):
    return [lora_linear(x, w, b, a, bb, s, p, True, seed) for (w, b, a, bb, seed), s, p in zip(members, scalings, ps)]


@pytest.mark.parametrize("ps", [(0.0, 0.0, 0.0), (0.1, 0.0, 0.3)])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_group_op_equals_layers_alone_float64(ps, lead, lora_node):
    K, shapes = 19, [(19, 4), (7, 2), (23, 5)]
    members = lora_members(K, shapes, torch.float64, base_grad=True)
    x = torch.randn(*lead, 13, K, dtype=torch.float64, requires_grad=True)
    scalings = (0.5, 2.0, 1.25)
    ys = lora_group_ys(x, members, scalings, ps)
    ref = _alone(x, members, scalings, ps)
    leaves = [x] + [t for m in members for t in m[:4]]
    gs = [torch.randn_like(y) for y in ys]
    got = torch.autograd.grad(ys, leaves, gs)
    want = torch.autograd.grad(ref, leaves, gs)
    for y, yr in zip(ys, ref, strict=True):
        assert torch.equal(y, yr)  # the same kernels per member: bit-identical outputs
    for g, gr in zip(got, want, strict=True):
        torch.testing.assert_close(g, gr, atol=1e-12, rtol=1e-12)


def test_group_op_gradcheck_with_dropout():
    K = 6
    members = lora_members(K, [(5, 2), (4, 3)], torch.float64)
    x = torch.randn(4, K, dtype=torch.float64, requires_grad=True)

    def fn(x, a0, b0, a1, b1):
        ms = [(m[0], m[1], a, b, m[4]) for m, a, b in zip(members, (a0, a1), (b0, b1))]
        return lora_group_ys(x, ms, (0.7, 1.3), (0.4, 0.2))

    leaves = (x, members[0][2], members[0][3], members[1][2], members[1][3])
    assert torch.autograd.gradcheck(fn, leaves)


def test_group_op_unused_output_and_frozen_x():
    K = 8
    members = lora_members(K, [(8, 2), (8, 2), (8, 2)], torch.float32)
    x = torch.randn(5, K)  # no grad: grad_x is never computed
    ys = lora_group_ys(x, members, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    ys[0].sum().backward()  # the other outputs are unused: their members get no grads
    assert members[0][2].grad is not None and members[0][3].grad is not None
    assert all(m[2].grad is None and m[3].grad is None for m in members[1:])
    ref = _alone(x, members[:1], (1.0,), (0.0,))[0]
    ga = torch.autograd.grad(ref.sum(), members[0][2])[0]
    torch.testing.assert_close(members[0][2].grad, ga)


def test_group_op_fp32_adapters_on_bf16_base():
    K = 16
    members = lora_members(K, [(16, 4), (8, 4)], torch.bfloat16, adapter_dtype=torch.float32)
    x = torch.randn(6, K, dtype=torch.bfloat16, requires_grad=True)
    ys = lora_group_ys(x, members, (2.0, 2.0), (0.1, 0.1))
    ref = _alone(x, members, (2.0, 2.0), (0.1, 0.1))
    leaves = [x] + [t for m in members for t in m[2:4]]
    got = torch.autograd.grad(ys, leaves, [torch.ones_like(y) for y in ys])
    want = torch.autograd.grad(ref, leaves, [torch.ones_like(y) for y in ref])
    for g, gr in zip(got, want, strict=True):
        assert g.dtype == gr.dtype
        torch.testing.assert_close(g, gr, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_triton_backward_accumulates_into_grad_x(p):
    """The GPU backward's accumulate mode (here through Triton's interpreter on CPU tensors)."""
    from ftkernels.triton import lora_linear as tk

    dev = "cuda" if CUDA else "cpu"
    M, K, N, r = 21, 40, 12, 4
    x, w = torch.randn(M, K, device=dev), torch.randn(N, K, device=dev)
    a, bb = torch.randn(r, K, device=dev), torch.randn(N, r, device=dev)
    seed = torch.tensor(77, device=dev)
    _, u = tk.forward(x, w, None, a, bb, 0.5, p, seed, "cublas")
    g = torch.randn(M, N, device=dev)
    gx, ga, gb = tk.backward(g, x, w, a, bb, u, 0.5, p, seed, True, "cublas")
    acc = torch.randn(M, K, device=dev)
    start = acc.clone()
    gx2, ga2, gb2 = tk.backward(g, x, w, a, bb, u, 0.5, p, seed, True, "triton", grad_x_acc=acc)
    assert gx2 is acc
    torch.testing.assert_close(acc, start + gx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ga2, ga)
    torch.testing.assert_close(gb2, gb)


def test_cpu_backward_accumulate_checks_its_buffer():
    from ftkernels._ext import C

    x, w, a, b = torch.randn(4, 6), torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2)
    u = x @ a.t()
    with pytest.raises(RuntimeError, match="grad_x_acc"):
        C().lora_linear_bwd_cpu(torch.randn(4, 5), x, w, a, b, u, 1.0, 0.0, 0, True, torch.randn(4, 7))


# -- the module machinery ---------------------------------------------------------------------


class Attn(nn.Module):
    """q, k, v read x; o reads something else (same in_features: a candidate that never joins)."""

    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d // 2), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        return self.o(torch.tanh(q) * v + k.mean(-1, keepdim=True))


def _pair(p=0.2, dtype=torch.float64, d=16):
    torch.manual_seed(0)
    base = nn.Sequential(Attn(d), Attn(d)).to(dtype)
    grouped = ftk.apply_lora(copy.deepcopy(base), ["q", "k", "v", "o"], r=4, dropout=p)
    alone = copy.deepcopy(grouped)
    lg.ungroup(alone)
    for m in ftk.peft_compat.lora_modules(grouped).values():
        nn.init.normal_(m.lora_B)
    alone.load_state_dict(grouped.state_dict())
    return grouped, alone


def _groups(model):
    return list({id(g): g for m in model.modules() if (g := getattr(m, "_lora_group", None))}.values())


def _step(model, x, seed):
    torch.manual_seed(seed)
    y = model(x)
    y.square().mean().backward()
    return y


def test_groups_learn_the_shared_run_and_train_like_layers_alone(lora_node):
    grouped, alone = _pair()
    opts = [ftk.optim.FusedAdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (grouped, alone)]
    assert len(_groups(grouped)) == 2 and not _groups(alone)
    for step in range(6):
        x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        y, y2 = _step(grouped, x, step), _step(alone, x2, step)
        # Same kernels and dropout seeds: a bit-identical first forward; later steps differ by the
        # rounding of grad_x's summation order (one buffer here, autograd's sum there).
        assert torch.equal(y, y2) if step == 0 else torch.allclose(y, y2, atol=1e-10, rtol=1e-10)
        for (n, a), b in [(("x", x), x2)] + list(zip(grouped.named_parameters(), alone.parameters(), strict=True)):
            if a.requires_grad:  # grads reach ~1e5 here: relative tolerance
                torch.testing.assert_close(a.grad, b.grad, atol=1e-12 * b.grad.abs().max().item(), rtol=1e-12, msg=n)
        for o in opts:
            o.step()
            o.zero_grad()
    assert [g.order for g in _groups(grouped)] == [[0, 1, 2], [0, 1, 2]]  # q, k, v; never o
    # One node for q/k/v: the grouped graph has two group nodes and no per-layer node for them.
    x = torch.randn(2, 16, dtype=torch.float64)
    y = grouped(x)  # held: a freed output frees the graph the walk reads
    assert lora_nodes(y.grad_fn) == [1, 1, 3, 3]  # two q/k/v nodes and the two o layers


def _learned(d=16, p=0.0):
    grouped, alone = _pair(p=p, d=d)
    for _ in range(2):
        grouped(torch.randn(2, d, dtype=torch.float64))
    attn = grouped[0]
    assert attn.q._lora_group.order == [0, 1, 2]
    return grouped, alone, attn


def test_miss_on_another_tensor_falls_back_and_relearns():
    _, _, attn = _learned()
    g = attn.q._lora_group
    x = torch.randn(3, 16, dtype=torch.float64)
    yq = attn.q(x)
    yk = attn.k(x.clone())  # not the leader's tensor: computed alone, the waiting v dropped
    assert not g._pending and g.order is None and g.misses == 1
    torch.testing.assert_close(yk, attn.k._forward_alone(x))
    torch.testing.assert_close(yq, attn.q._forward_alone(x))


@pytest.mark.parametrize("change", ["x_in_place", "adapter_in_place", "eval", "no_grad"])
def test_changes_between_leader_and_member_are_seen(change):
    _, _, attn = _learned()
    x = torch.randn(3, 16, dtype=torch.float64)
    attn.q(x)
    if change == "x_in_place":
        x.mul_(2)
    elif change == "adapter_in_place":
        with torch.no_grad():
            attn.k.lora_B.add_(1.0)
    elif change == "eval":
        attn.k.eval()
    ctx = torch.no_grad() if change == "no_grad" else torch.enable_grad()
    with ctx:
        yk = attn.k(x)
    assert attn.q._lora_group.misses == 1
    with ctx:
        torch.testing.assert_close(yk, attn.k._forward_alone(x), atol=0, rtol=0)


def test_inference_mode_runs_alone():
    grouped, alone, _ = _learned()
    with torch.inference_mode():
        x = torch.randn(3, 16, dtype=torch.float64)
        torch.testing.assert_close(grouped(x), alone(x))


def test_member_called_twice_or_merged_runs_alone():
    _, _, attn = _learned()
    x = torch.randn(3, 16, dtype=torch.float64)
    attn.q(x)
    attn.k(x)
    y = attn.k(x)  # k again: nothing waiting for it any more
    torch.testing.assert_close(y, attn.k._forward_alone(x))
    attn.v.merge()
    x = torch.randn(3, 16, dtype=torch.float64)
    for _ in range(3):
        ys = [attn.q(x), attn.k(x), attn.v(x)]
        assert not attn.q._lora_group._pending
    attn.v.unmerge()
    torch.testing.assert_close(ys[2], attn.v._forward_alone(x))


def test_group_gives_up_after_repeated_misses():
    _, _, attn = _learned()
    g = attn.q._lora_group
    for _ in range(lg._MAX_MISSES + 2):
        x = torch.randn(2, 16, dtype=torch.float64)
        attn.q(x), attn.q(x), attn.k(x), attn.v(x)  # q twice and then k: a miss each time it fuses
        attn.q(x.clone()), attn.k(x.clone())
    assert g.misses >= lg._MAX_MISSES and g.order is None
    x = torch.randn(2, 16, dtype=torch.float64)
    attn.q(x), attn.k(x), attn.v(x)
    assert g.order is None and not g._pending


def test_env_switch_copies_and_pickles(monkeypatch):
    grouped, _, attn = _learned()
    x = torch.randn(2, 16, dtype=torch.float64)
    attn.q(x)  # outputs waiting: copies must not carry them
    twin = copy.deepcopy(grouped)
    g2 = twin[0].q._lora_group
    assert g2 is twin[0].k._lora_group and g2.members[0] is twin[0].q and not g2._pending
    torch.testing.assert_close(twin(x), grouped(x))
    loaded = pickle.loads(pickle.dumps(twin))
    torch.testing.assert_close(loaded(x), twin(x))
    monkeypatch.setenv(lg.ENV, "0")
    assert lg.group_shared_inputs(grouped) == [] and not _groups(grouped)


def test_compile_traces_each_layer_without_graph_breaks():
    grouped, alone, _ = _learned(p=0.0)
    grouped.eval()
    x = torch.randn(3, 16, dtype=torch.float64)
    explain = torch._dynamo.explain(grouped)(x)
    assert explain.graph_break_count == 0
    compiled = torch.compile(grouped, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), alone.eval()(x))


# -- real models --------------------------------------------------------------------------------


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=50)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg), ["query", "key", "value", "dense"], "attention.self"


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=50, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return LlamaForCausalLM(cfg), projections, "self_attn"


@pytest.mark.parametrize("build", [_bert, _llama])
@pytest.mark.parametrize("ckpt", [False, True])
def test_hf_models_group_qkv_and_match_layers_alone(build, ckpt):
    base, targets, attn_name = build()
    grouped = ftk.apply_lora(copy.deepcopy(base), targets, r=4, alpha=8, dropout=0.2)
    alone = copy.deepcopy(grouped)
    lg.ungroup(alone)
    for m in (grouped, alone):
        if ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(3))
    for step in range(3):
        losses = []
        for m in (grouped, alone):
            m.zero_grad()
            torch.manual_seed(step)
            out = m(input_ids=ids, labels=ids if build is _llama else torch.tensor([0, 1]))
            out.loss.backward()
            losses.append(out.loss.detach())
        assert torch.equal(losses[0], losses[1])
        for (n, a), b in zip(grouped.named_parameters(), alone.parameters(), strict=True):
            if a.requires_grad:
                torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=n)
    orders = {n: m._lora_group.order for n, m in grouped.named_modules() if getattr(m, "_lora_group", None)}
    if ckpt:  # non-reentrant checkpointing's saved-tensor hooks: every layer runs alone, nothing learned
        assert orders and all(o is None for o in orders.values())
        return
    attn = [o for n, o in orders.items() if attn_name in n]
    assert attn and all(o == [0, 1, 2] for o in attn)  # q, k, v in call order
    if build is _llama:
        mlp = [o for n, o in orders.items() if n.endswith("gate_proj")]
        assert mlp and all(o == [0, 1] for o in mlp)  # gate and up share x; down reads another tensor


def test_group_function_is_the_only_node_for_llama_qkv(lora_node):
    base, targets, _ = _llama()
    model = ftk.apply_lora(base, targets, r=4, alpha=8)
    ids = torch.randint(1, 50, (1, 5))
    model(input_ids=ids)  # learns
    # Per layer (2 here): one node for q/k/v and one for gate/up; o and down alone.
    assert lora_nodes(model(input_ids=ids).logits.grad_fn) == [1, 1, 1, 1, 2, 2, 3, 3]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_group_op_equals_layers_alone(dtype, p):
    K, shapes = 256, [(256, 16), (64, 16), (256, 16)]
    members = lora_members(K, shapes, dtype, device="cuda", adapter_dtype=torch.float32)
    x = torch.randn(4, 33, K, dtype=dtype, device="cuda", requires_grad=True)
    ys = lora_group_ys(x, members, (2.0, 2.0, 2.0), (p, p, p))
    ref = _alone(x, members, (2.0, 2.0, 2.0), (p, p, p))
    leaves = [x] + [t for m in members for t in m[2:4]]
    gs = [torch.randn_like(y) for y in ys]
    got = torch.autograd.grad(ys, leaves, gs)
    want = torch.autograd.grad(ref, leaves, gs)
    for y, yr in zip(ys, ref, strict=True):
        assert torch.equal(y, yr)
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # grad_x: one buffer vs autograd's sum
    for g, gr in zip(got, want, strict=True):
        torch.testing.assert_close(g, gr, atol=tol * max(1.0, gr.abs().max().item()), rtol=tol)
