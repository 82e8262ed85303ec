"""Fused LoReFT: the op against the plain-PyTorch reference (CPU C++ and Triton), gradcheck, the
module (orthonormal R through training, dropout stream, saved tensors, errors), and apply_reft on a
small BERT (positions, frozen model, training, save/load)."""

import copy

import pytest
import torch
from torch import nn

import ftkernels as ftk
from ftkernels.nn.reference import lora_keep_mask, loreft_reference
from ftkernels.ops import loreft as ops
from ftkernels.reft import parse_positions, position_index

CUDA = torch.cuda.is_available()
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def params(d, r, dtype=torch.float64, device="cpu"):
    """A random orthonormal-row R and random W, b (fresh draws; none zero)."""
    rot = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64))[0].t().contiguous()
    w, b = torch.randn(r, d, dtype=torch.float64), torch.randn(r, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (rot, w, b)]


def check_against_reference(fn, h, rot, w, b, p, seed, tol):
    """fn(h, rot, w, b) against the float64 reference: output and the grads of all four inputs."""
    out = fn(h, rot, w, b)
    assert out.shape == h.shape and out.dtype == h.dtype
    leaves = [t.detach().double().requires_grad_(True) for t in (h, rot, w, b)]
    ref = loreft_reference(*leaves, p, seed)
    g = torch.randn_like(ref).to(h.dtype)
    scale = lambda t: tol * max(1.0, t.abs().max().item())  # noqa: E731
    torch.testing.assert_close(out.double(), ref, atol=scale(ref), rtol=tol)
    got = torch.autograd.grad(out, (h, rot, w, b), g)
    want = torch.autograd.grad(ref, leaves, g.double())
    for name, a, e in zip(("h", "R", "W", "b"), got, want, strict=True):
        assert a.dtype == (h.dtype if name == "h" else rot.dtype)
        torch.testing.assert_close(a.double(), e, atol=scale(e), rtol=tol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("lead", "d", "r"), [((1,), 5, 1), ((3, 7), 37, 4), ((130,), 64, 8), ((2, 1, 3), 9, 3)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cpu_op_matches_reference(dtype, lead, d, r, p):
    rot, w, b = params(d, r, torch.float64 if dtype == torch.float64 else torch.float32)
    h = torch.randn(*lead, d).to(dtype).requires_grad_(True)
    seed = torch.tensor(41)
    check_against_reference(lambda *a: ops.loreft_apply(*a, p, seed), h, rot, w, b, p, 41, TOL[dtype])


def test_many_blocks_across_threads():
    """Enough rows for several blocks per thread (per-thread partials summed)."""
    rot, w, b = params(96, 4, torch.float32)
    h = torch.randn(900, 96, dtype=torch.bfloat16, requires_grad=True)
    seed = torch.tensor(3)
    check_against_reference(lambda *a: ops.loreft_apply(*a, 0.2, seed), h, rot, w, b, 0.2, 3, TOL[torch.bfloat16])


def test_gradcheck_float64_with_dropout():
    torch.manual_seed(3)
    rot, w, b = params(11, 3)
    h = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(8)
    assert torch.autograd.gradcheck(lambda *a: ops.loreft_apply(*a, 0.4, seed), (h, rot, w, b))


def test_dropout_mask_is_the_lora_stream():
    """Dropped elements of h' are exactly zero where the stream drops, kept ones scaled by 1/(1-p)."""
    rot, w, b = params(40, 2, torch.float32)
    h = torch.randn(30, 40)
    out = ops.loreft_apply(h, rot.detach(), w.detach(), b.detach(), 0.5, torch.tensor(99))
    keep = lora_keep_mask(99, 30, 40, 0.5)
    assert torch.all(out[~keep] == 0)
    full = ops.loreft_apply(h, rot.detach(), w.detach(), b.detach(), 0.0, torch.tensor(99))
    torch.testing.assert_close(out[keep], full[keep] / 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("M", "d", "r", "p"), [(70, 45, 4, 0.0), (33, 100, 3, 0.25), (40, 64, 8, 0.1), (37, 50, 12, 0.1)]
)
def test_triton_path_matches_reference(dtype, M, d, r, p):
    """The Triton kernels (interpreter on CPU; the GPU when present): fp32 adapters, h in fp32/fp16."""
    from ftkernels.triton import loreft as tk

    dev = "cuda" if CUDA else "cpu"
    rot, w, b = params(d, r, torch.float32, dev)
    h = torch.randn(M, d, device=dev).to(dtype)
    seed = torch.tensor(77, device=dev)
    out, s = tk.forward(h, rot.detach(), w.detach(), b.detach(), p, seed)
    leaves = [t.detach().double().requires_grad_(True) for t in (h, rot, w, b)]
    ref = loreft_reference(*leaves, p, 77)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
    g = torch.randn(M, d, device=dev).to(dtype)
    got = tk.backward(g, h, rot.detach(), w.detach(), s, p, seed)
    want = torch.autograd.grad(ref, leaves, g.double())
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), e, atol=tol * max(1.0, e.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_triton_fma_prefetch_variant_matches_reference(monkeypatch, p):
    """The r <= 4 kernels with next-tile prefetch (an option until timed on a GPU): same results,
    at sizes whose last tiles and row blocks are partial."""
    from ftkernels.triton import loreft as tk

    monkeypatch.setattr(tk, "FMA_PREFETCH", True)
    test_triton_path_matches_reference(torch.float32, 70, 45, 4, p)
    test_triton_path_matches_reference(torch.float16, 33, 100, 3, p)


def test_triton_and_cpu_share_the_stream():
    from ftkernels.triton import loreft as tk

    rot, w, b = params(48, 4, torch.float32)
    h = torch.randn(20, 48)
    seed = torch.tensor(1234)
    cpu, _ = ops._fwd_impl(h, rot.detach(), w.detach(), b.detach(), 0.3, seed)
    dev = "cuda" if CUDA else "cpu"
    tri, _ = tk.forward(h.to(dev), rot.detach().to(dev), w.detach().to(dev), b.detach().to(dev), 0.3, seed.to(dev))
    assert torch.equal(cpu == 0, tri.cpu() == 0)
    torch.testing.assert_close(tri.cpu(), cpu, atol=1e-5, rtol=1e-5)


def test_eager_node_equals_custom_op_and_opcheck():
    rot, w, b = params(13, 3)
    h = torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(21)
    y1 = ops.LoReFTFunction.apply(h, rot, w, b, 0.3, seed)
    y2 = ops.loreft_fwd(h.reshape(-1, 13), rot, w, b, 0.3, seed)[0].view(2, 5, 13)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    g1, g2 = torch.autograd.grad(y1, (h, rot, w, b), g), torch.autograd.grad(y2, (h, rot, w, b), g)
    for u, v in zip(g1, g2, strict=True):
        assert torch.equal(u, v)
    h2 = torch.randn(9, 13, dtype=torch.float64)
    torch.library.opcheck(ops.loreft_fwd, (h2, rot.detach(), w.detach(), b.detach(), 0.3, seed))
    torch.library.opcheck(ops.loreft_fwd, (h2.requires_grad_(True), rot, w, b, 0.0, seed))
    out, s = ops.loreft_fwd(h2.detach(), rot.detach(), w.detach(), b.detach(), 0.3, seed)
    torch.library.opcheck(ops.loreft_bwd, (torch.randn_like(out), h2.detach(), rot.detach(), w.detach(), s, 0.3, seed))


# ------------------------------------------------------------------ the module


def test_module_matches_reference_and_saves_no_copy():
    m = ftk.nn.LoReFT(24, 4, dropout=0.2)
    with torch.no_grad():
        m.learned_source.weight.normal_()
    h = torch.randn(4, 50, 24, dtype=torch.bfloat16, requires_grad=True)  # bigger than R's d x d factors
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = m(h, seed=torch.tensor(5))
    big = [t for t in saved if t.numel() >= h.numel()]
    assert len(big) == 1 and big[0].data_ptr() == h.data_ptr()  # only h itself, no dropped copy
    R, W, b = m.rotation.detach(), m.learned_source.weight.detach(), m.learned_source.bias.detach()
    ref = loreft_reference(h.detach().double(), R.double(), W.double(), b.double(), 0.2, 5)
    torch.testing.assert_close(out.double(), ref, atol=3e-2 * ref.abs().max().item(), rtol=3e-2)
    out.float().sum().backward()
    assert m.learned_source.weight.grad.dtype == torch.float32
    assert m.rotate_layer.parametrizations.weight.original.grad is not None
    m.eval()
    torch.testing.assert_close(m(h).double(), loreft_reference(h.detach().double(), R.double(), W.double(), b.double()),
                               atol=3e-2, rtol=3e-2)  # fmt: skip


@pytest.mark.parametrize("lead", [(5,), (2, 5)])
def test_output_takes_in_place_ops(lead):
    """The intervened h' is no view made inside the autograd Function, so a residual add or an
    in-place activation on it works; grads as without the in-place op (an add passes them through)."""
    torch.manual_seed(0)
    m = ftk.nn.LoReFT(16, 4)
    with torch.no_grad():
        m.learned_source.weight.normal_()
    h = torch.randn(*lead, 16, requires_grad=True)
    g = torch.randn(*lead, 16)
    (want,) = torch.autograd.grad(m(h), h, g)
    out = m(h)
    out += 1.0
    (got,) = torch.autograd.grad(out, h, g)
    torch.testing.assert_close(got, want)


def test_rotation_stays_orthonormal_while_training():
    torch.manual_seed(0)
    m = ftk.nn.LoReFT(32, 4, dropout=0.1)
    opt = torch.optim.AdamW(m.parameters(), lr=0.05)
    h, target = torch.randn(64, 32), torch.randn(64, 32)
    start = m.rotation.detach().clone()
    losses = []
    for _ in range(30):
        loss = (m(h) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        R = m.rotation
        torch.testing.assert_close(R @ R.t(), torch.eye(4), atol=1e-5, rtol=0)
    assert not torch.allclose(m.rotation, start)  # R itself moved
    assert losses[-1] < 0.9 * losses[0]


def test_bad_input_errors():
    with pytest.raises(ValueError, match="exceeds"):
        ftk.nn.LoReFT(4, 5)
    with pytest.raises(ValueError, match="dropout"):
        ftk.nn.LoReFT(8, 2, dropout=1.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        ftk.nn.LoReFT(8, 2, dtype=torch.bfloat16)
    m = ftk.nn.LoReFT(8, 2)
    with pytest.raises(ValueError, match="expected"):
        m(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(3, 8, dtype=torch.int64))


# ------------------------------------------------------------------ apply_reft on a small BERT


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37, vocab_size=60)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    return BertForSequenceClassification(cfg).eval()


def test_parse_positions():
    assert parse_positions("f3+l3") == (3, 3) and parse_positions("l2") == (0, 2) and parse_positions("f1") == (1, 0)
    assert parse_positions("all") is None
    for bad in ("f3+f2", "x1", "f0", "", "l1+"):
        with pytest.raises(ValueError):
            parse_positions(bad)


def test_position_index_with_padding_and_short_sequences():
    valid = torch.zeros(4, 9, dtype=torch.bool)
    valid[0, :] = True  # full
    valid[1, :5] = True  # right padding
    valid[2, 6:] = True  # left padding, 3 tokens: shorter than f + l
    valid[3, 2:4] = True  # 2 tokens
    pos, keep = position_index(valid, 2, 2)
    for b in range(4):
        idx = valid[b].nonzero().flatten().tolist()
        want = sorted(set(idx[:2]) | set(idx[-2:]))
        got = sorted(pos[b][keep[b]].tolist())
        assert got == want, (b, got, want)
        assert all(valid[b, i] for i in pos[b].tolist())  # ignored slots still point at real tokens


def test_apply_reft_intervenes_only_at_positions_and_freezes_the_model(tmp_path):
    model = _bert()
    ids = torch.randint(0, 60, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    seen = {}
    layer = model.bert.encoder.layer[1]
    before = model(input_ids=ids, attention_mask=mask).logits
    reft = ftk.apply_reft(model, layers=[1, 2], positions="f1+l2", r=2)
    with torch.no_grad():
        for iv in reft.interventions.values():
            iv.learned_source.weight.normal_()

    def observe(mod, args, out):
        seen["h"] = out[0] if isinstance(out, tuple) else out

    handle = layer.register_forward_hook(observe)
    reft.remove()
    model(input_ids=ids, attention_mask=mask)
    plain = seen["h"].detach()
    reft.save(str(tmp_path / "reft.pt"))
    reft = ftk.load_reft(model, str(tmp_path / "reft.pt"))  # hooks back on, same weights
    layer._forward_hooks.move_to_end(handle.id)  # observe after the intervention
    out = model(input_ids=ids, attention_mask=mask).logits
    changed = (seen["h"] - plain).abs().amax(-1) > 0
    want = torch.zeros(2, 10, dtype=torch.bool)
    want[0, [0, 8, 9]] = True
    want[1, [0, 5, 6]] = True
    assert torch.equal(changed, want)
    assert not torch.allclose(out, before)
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in reft.parameters())
    assert reft.summary()["trainable"] == 2 * (2 * 32 * 2 + 2)
    handle.remove()


def test_bert_with_loreft_trains_and_save_load_round_trips(tmp_path):
    torch.manual_seed(0)
    model = _bert()
    reft = ftk.apply_reft(model, layers=[0, 2], positions="f3+l3", r=4, dropout=0.05)
    opt = ftk.optim.FusedAdamW(reft.parameters(), lr=2e-2)
    ids = torch.randint(0, 60, (16, 12))
    labels = torch.randint(0, 2, (16,))
    mask = torch.ones(16, 12, dtype=torch.long)
    mask[::2, 9:] = 0
    model.train()
    losses = []
    for _ in range(25):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses  # only the interventions train (the head is frozen too)
    for iv in reft.interventions.values():
        R = iv.rotation
        torch.testing.assert_close(R @ R.t(), torch.eye(4), atol=1e-5, rtol=0)
    model.eval()  # switches the interventions' dropout off too
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)
    path = str(tmp_path / "reft.pt")
    reft.save(path)
    reft.remove()
    fresh = copy.deepcopy(model)
    loaded = ftk.load_reft(fresh, path)
    with torch.no_grad():
        got = fresh(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want)
    assert loaded.config == reft.config


def test_apply_reft_bad_input():
    model = _bert()
    with pytest.raises(ValueError, match="layers"):
        ftk.apply_reft(model, layers=[5])
    with pytest.raises(ValueError, match="positions"):
        ftk.apply_reft(model, layers=[0], positions="middle")
    with pytest.raises(ValueError, match="hidden_size"):
        ftk.apply_reft(nn.Sequential(nn.ModuleList([nn.Linear(2, 2)])), layers=[0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_cuda_op_matches_reference(dtype, p):
    rot, w, b = params(200, 4, torch.float32, "cuda")
    h = torch.randn(3, 77, 200, device="cuda").to(dtype).requires_grad_(True)
    seed = torch.tensor(17, device="cuda")
    check_against_reference(lambda *a: ops.loreft_apply(*a, p, seed), h, rot, w, b, p, 17, TOL[dtype])


def test_llama_decoder_layers_and_compile():
    """A decoder (layers returning a tensor or a tuple, left padding) takes the interventions too, and
    the module compiles without graph breaks (the custom op when traced)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    reft = ftk.apply_reft(model, layers="all", positions="l2", r=2)
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(p.grad is not None for p in reft.parameters())
    m = ftk.nn.LoReFT(16, 2, dropout=0.2)
    h = torch.randn(3, 5, 16)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    seed = torch.tensor(3)
    torch.testing.assert_close(compiled(h, seed=seed), m(h, seed=seed))
