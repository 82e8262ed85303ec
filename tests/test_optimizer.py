"""Fused optimizers vs torch.optim and vs the plain-PyTorch reference (ftkernels.optim.reference)."""

import copy
import pickle

import pytest
import torch

import ftkernels as ftk
from ftkernels.optim import FusedAdagrad, FusedAdamW, FusedRMSprop, FusedSGD
from ftkernels.optim.reference import ReferenceOptimizer, philox_uniform

SIZES = [(1,), (3,), (1023,), (65537,), (7, 13)]
FUSED = {"adamw": FusedAdamW, "sgd": FusedSGD, "adagrad": FusedAdagrad, "rmsprop": FusedRMSprop}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_params(dtype=torch.float32, device="cpu", sizes=SIZES):
    return [torch.randn(s, dtype=dtype, device=device) for s in sizes]


def clones(ps):
    return [torch.nn.Parameter(p.clone()) for p in ps]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def run_pair(opt_a, pa, opt_b, pb, steps, grad_fn=None, device="cpu"):
    for _ in range(steps):
        for pa_i, pb_i in zip(pa, pb):
            g = grad_fn(pa_i) if grad_fn else torch.randn_like(pa_i)
            pa_i.grad = g.clone()
            pb_i.grad = g.clone()
        opt_a.step()
        opt_b.step()


# ---------------------------------------------------------------- match torch.optim, 50 steps
TORCH_CASES = [
    ("adamw", torch.optim.AdamW, dict(lr=1e-2)),
    ("adamw", torch.optim.AdamW, dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=True)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, maximize=True)),
    ("sgd", torch.optim.SGD, dict(lr=1e-2)),
    ("sgd", torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    ("sgd", torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, maximize=True)),
    ("adagrad", torch.optim.Adagrad, dict(lr=1e-2, lr_decay=1e-2, weight_decay=1e-3, initial_accumulator_value=0.1)),
    ("adagrad", torch.optim.Adagrad, dict(lr=1e-2, maximize=True)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-3)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-3, centered=True, momentum=0.9, weight_decay=1e-3)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-3, alpha=0.9, momentum=0.5, maximize=True)),
    # torch's implementation switches, as code written for torch.optim passes them: accepted, same math
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, foreach=True, capturable=False, differentiable=False)),
    ("sgd", torch.optim.SGD, dict(lr=1e-2, momentum=0.9, foreach=False, fused=None)),
    ("adagrad", torch.optim.Adagrad, dict(lr=1e-2, foreach=True)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-3, foreach=True, capturable=False)),
]


@pytest.mark.parametrize("kind", list(FUSED))
def test_torch_switches_stay_out_of_param_groups_and_differentiable_raises(kind):
    p = torch.nn.Parameter(torch.randn(5))
    opt = FUSED[kind]([p], lr=1e-2, foreach=True, fused=True, capturable=True)
    assert not {"foreach", "fused", "capturable", "differentiable"} & set(opt.param_groups[0])
    with pytest.raises(NotImplementedError, match="differentiable=True is not supported"):
        FUSED[kind]([p], lr=1e-2, differentiable=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,torch_cls,kw", TORCH_CASES)
def test_matches_torch_50_steps(kind, torch_cls, kw, device):
    ps = make_params(device=device)
    pa, pb = clones(ps), clones(ps)
    ref, ours = torch_cls(pa, **kw), FUSED[kind](pb, **kw)
    run_pair(ref, pa, ours, pb, 50)
    for a, b in zip(pa, pb):
        assert rel_err(b, a) <= 1e-6
    for a, b in zip(pa, pb):  # same state names, same values
        for k, v in ref.state[a].items():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                assert rel_err(ours.state[b][k], v) <= 1e-5, k


# ---------------------------------------------------------------- state dicts
@pytest.mark.parametrize("kind,torch_cls,kw", TORCH_CASES[:11])
def test_state_dict_round_trip_with_torch(kind, torch_cls, kw):
    """A run moves torch -> ours -> torch through state dicts, mid-training, and stays on the pure
    torch run. torch.optim.SGD keeps no ``step``: loaded as past the first step (before the fix its
    momentum buffer restarted from the gradient, 3e-2 off after 6 steps)."""
    ps = make_params(dtype=torch.float64)
    p_ref, p_run = clones(ps), clones(ps)
    ref, run = torch_cls(p_ref, **kw), torch_cls(p_run, **kw)
    run_pair(ref, p_ref, run, p_run, 5)
    for cls in (FUSED[kind], torch_cls):  # into ours, then back into torch
        nxt = cls(p_run, **kw)
        nxt.load_state_dict(copy.deepcopy(run.state_dict()))
        run = nxt
        run_pair(ref, p_ref, run, p_run, 5)
        for a, b in zip(p_ref, p_run):
            assert rel_err(b, a) <= 1e-12, cls.__name__


def test_load_state_dict_of_another_optimizer_or_bad_hyper_changes_nothing():
    ps = make_params()
    sgd = FUSED["sgd"](ps, lr=1e-2, momentum=0.9)
    adamw = FusedAdamW(ps, lr=1e-3)
    for p in ps:
        p.grad = torch.randn_like(p)
    sgd.step()
    adamw.step()
    before = copy.deepcopy(adamw.state_dict())
    with pytest.raises(ValueError, match=r"param group 0 lacks \['betas', 'eps'\]: was it saved by another"):
        adamw.load_state_dict(sgd.state_dict())
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["betas"] = (1.5, 0.999)
    with pytest.raises(ValueError, match="betas must be in"):
        adamw.load_state_dict(bad)
    after = adamw.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(after["state"][i][k], v), k


@pytest.mark.parametrize("kind", list(FUSED))
def test_copied_optimizer_loads_its_own_state_dict(kind):
    """``copy.deepcopy`` / pickling (Accelerate's ``prepare`` does the same) runs torch's ``__setstate__``,
    which adds ``differentiable`` to ``defaults``: a key our param groups never carry, which must not
    make the optimizer refuse its own state dict."""
    ps = make_params()
    opt = FUSED[kind](ps, lr=1e-2)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    twin = copy.deepcopy(opt)
    assert "differentiable" in twin.defaults
    saved = copy.deepcopy(opt.state_dict())
    twin.load_state_dict(saved)
    opt.load_state_dict(pickle.loads(pickle.dumps(saved)))
    for a, b in zip(opt.state_dict()["state"].values(), twin.state_dict()["state"].values()):
        for k, v in a.items():
            assert torch.equal(b[k], v), k


@pytest.mark.parametrize("kind", list(FUSED))
def test_save_resume_is_bit_exact(kind):
    opts = dict(grad_dropout=0.2, l2sp=0.01, l1=1e-4, max_grad_norm=5.0)
    if kind == "sgd":
        opts["momentum"] = 0.9
    ps = make_params()
    grads = [[torch.randn_like(p) for p in ps] for _ in range(20)]
    mask = torch.rand(ps[3].shape) > 0.3

    def train(params, opt, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    torch.manual_seed(7)
    full = clones(ps)
    ftk.set_grad_mask(full[3], mask)
    opt = FUSED[kind](full, lr=1e-2, **opts)
    train(full, opt, grads)

    torch.manual_seed(7)
    half = clones(ps)
    ftk.set_grad_mask(half[3], mask)
    opt = FUSED[kind](half, lr=1e-2, **opts)
    train(half, opt, grads[:10])
    saved = copy.deepcopy({"params": [p.detach() for p in half], "opt": opt.state_dict()})
    rng = torch.get_rng_state()

    resumed = clones(saved["params"])
    ftk.set_grad_mask(resumed[3], mask)
    opt2 = FUSED[kind](resumed, lr=1e-2, **opts)
    opt2.load_state_dict(saved["opt"])
    torch.set_rng_state(rng)
    train(resumed, opt2, grads[10:])
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- every option vs the reference
OPTION_CASES = [
    dict(),
    dict(weight_decay=0.1),
    dict(l2=0.05),
    dict(l1=0.02),
    dict(l2sp=0.3),
    dict(ewc=0.5),
    dict(grad_dropout=0.3),
    dict(max_grad_norm=0.5),
    dict(grad_dropout=0.1, l1=0.01, l2=0.01, l2sp=0.1, ewc=0.2, max_grad_norm=3.0, weight_decay=0.01),
]
KIND_KW = {
    "adamw": dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0),
    "sgd": dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.0),
    "adagrad": dict(lr=1e-2, lr_decay=0.0, eps=1e-10, weight_decay=0.0),
    "rmsprop": dict(lr=1e-3, alpha=0.99, eps=1e-8, centered=True, momentum=0.5, weight_decay=0.0),
}


def fisher_for(ps):
    return {p: torch.rand_like(p) for p in ps}


def check_against_reference(kind, opts, dtype, device="cpu", steps=6, masked=True, tol=None):
    """Fused in ``dtype`` vs the reference in fp64. In fp32 the bound is the larger of 2e-5 and 10x
    the error of the same reference run in fp32 (ill-conditioned cases, e.g. centered RMSprop
    under strong penalties, lose digits in any fp32 implementation)."""
    kw = {**KIND_KW[kind], **opts}
    ps = make_params(dtype=dtype, device=device)
    pf, pr, p32 = clones(ps), clones([p.cpu().double() for p in ps]), clones([p.cpu().float() for p in ps])
    fisher = fisher_for(pf) if kw.get("ewc") else None
    fisher_r = {r: fisher[f].cpu().double() for f, r in zip(pf, pr)} if fisher else None
    fisher_32 = {r: fisher[f].cpu().float() for f, r in zip(pf, p32)} if fisher else None
    if masked:
        m = torch.rand(ps[3].shape) > 0.4
        ftk.set_grad_mask(pf[3], m.to(device))
        ftk.set_grad_mask(pr[3], m)
        ftk.set_grad_mask(p32[3], m)
    fused = FUSED[kind](pf, fisher=fisher, **kw)
    ref = ReferenceOptimizer(kind, pr, fisher=fisher_r, **kw)
    ref32 = ReferenceOptimizer(kind, p32, fisher=fisher_32, **kw)
    for s in range(steps):
        torch.manual_seed(100 + s)
        for a, b, c in zip(pf, pr, p32):
            g = torch.randn_like(b) * 3
            a.grad = g.to(device=device, dtype=dtype)
            b.grad = a.grad.detach().cpu().double()
            c.grad = a.grad.detach().cpu().float()
        for o in (fused, ref, ref32):
            torch.manual_seed(100 + s)
            o.step()
    if tol is None:
        tol = 1e-9
        if dtype == torch.float32:
            tol = max(2e-5, 10 * max(rel_err(c, b) for c, b in zip(p32, pr)))
        elif kw.get("max_grad_norm"):
            tol = 1e-6  # the global norm (and so the clip coefficient) is carried in fp32
    for a, b in zip(pf, pr):
        assert rel_err(a.cpu(), b) <= tol
    return pf, pr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("opts", OPTION_CASES, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("kind", list(FUSED))
def test_options_against_reference(kind, opts, dtype, device):
    if device == "cuda" and dtype == torch.float64 and opts.get("grad_dropout"):
        pytest.skip("covered on CPU")
    check_against_reference(kind, opts, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", list(FUSED))
def test_low_precision_with_master_weights(kind, low, device):
    """bf16/fp16 params + fp32 master: the master follows the fp32 reference, the param is its rounding."""
    kw = {**KIND_KW[kind], "l2sp": 0.1, "grad_dropout": 0.2}
    ps = make_params(dtype=low, device=device)
    pf, pr = clones(ps), clones([p.float().cpu() for p in ps])
    fused = FUSED[kind](pf, master_weights=True, **kw)
    ref = ReferenceOptimizer(kind, pr, **kw)
    for s in range(5):
        for a, b in zip(pf, pr):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.float().cpu()
        torch.manual_seed(s)
        fused.step()
        torch.manual_seed(s)
        ref.step()
    for a, b in zip(pf, pr):
        master = fused.state[a]["master"]
        assert master.dtype == torch.float32
        assert fused.state[a]["step"].item() == 5
        assert rel_err(master.cpu(), b) <= 1e-5
        assert torch.equal(a, master.to(low))


@pytest.mark.parametrize("kind", list(FUSED))
def test_bf16_without_master_one_step(kind):
    """bf16 params and bf16 state: math in fp32, each stored value rounded once."""
    kw = KIND_KW[kind]
    ps = make_params(dtype=torch.bfloat16)
    pf, pr = clones(ps), clones([p.float() for p in ps])
    fused, ref = FUSED[kind](pf, **kw), ReferenceOptimizer(kind, pr, **kw)
    for a, b in zip(pf, pr):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.float()
    fused.step()
    ref.step()
    for a, b in zip(pf, pr):
        assert fused.state[a][next(k for k in fused.state[a] if k != "step")].dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", list(FUSED))
def test_cpu_simd_loop_stores_the_scalar_loops_bits(kind, dtype, master):
    """The CPU kernel runs 8-element SIMD vectors (bf16/fp16 widened to fp32 and rounded back) and a
    scalar loop for a tensor's last numel % 8 elements: one 1029-element param must step to the same
    bits as 1029 one-element params (scalar loop only), masked elements included."""
    if master and dtype in (torch.float32, torch.float64):
        pytest.skip("master weights exist for bf16/fp16 params only")
    kw = {**KIND_KW[kind], "weight_decay": 0.05, "l1": 1e-3, "l2sp": 0.1, "master_weights": master}
    values = torch.randn(1029, dtype=dtype)
    mask = torch.rand(1029) > 0.3
    whole = torch.nn.Parameter(values.clone())
    singles = [torch.nn.Parameter(v.clone().reshape(1)) for v in values]
    ftk.set_grad_mask(whole, mask)
    for p, m in zip(singles, mask):
        ftk.set_grad_mask(p, m.reshape(1))
    opt_w, opt_s = FUSED[kind]([whole], **kw), FUSED[kind](singles, **kw)
    for _ in range(3):
        g = torch.randn(1029, dtype=dtype)
        whole.grad = g.clone()
        for p, gi in zip(singles, g):
            p.grad = gi.reshape(1).clone()
        opt_w.step()
        opt_s.step()
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    same = lambda a, b: torch.equal(a.view(bits[a.element_size()]), b.view(bits[b.element_size()]))  # noqa: E731
    assert same(whole.detach(), torch.cat([p.detach() for p in singles]))
    kept = [p for p, m in zip(singles, mask) if m]  # (a frozen single has empty compact state)
    for key, v in opt_w.state[whole].items():
        if torch.is_tensor(v) and v.numel() == 1029:
            assert same(v[mask], torch.cat([opt_s.state[p][key] for p in kept])), key
    assert not torch.equal(whole.detach(), values)


@pytest.mark.parametrize("kind", list(FUSED))
def test_bf16_anchor_and_fisher(kind):
    kw = {**KIND_KW[kind], "l2sp": 0.2, "ewc": 0.3}
    ps = make_params()
    pf, pr = clones(ps), clones(ps)
    fisher = fisher_for(pf)
    fused = FUSED[kind](pf, fisher=fisher, anchor_dtype=torch.bfloat16, **kw)
    assert fused.state[pf[0]]["anchor"].dtype == torch.bfloat16
    anchors = {b: a.detach().bfloat16().float() for a, b in zip(pf, pr)}
    fisher_r = {b: fisher[a].bfloat16().float() for a, b in zip(pf, pr)}
    ref = ReferenceOptimizer(kind, pr, anchors=anchors, fisher=fisher_r, **kw)
    run_pair(fused, pf, ref, pr, 4)
    for a, b in zip(pf, pr):
        assert rel_err(a, b) <= 2e-5
    sd = copy.deepcopy(fused.state_dict())
    fresh = clones(ps)
    fused2 = FUSED[kind](fresh, fisher=fisher_for(fresh), **kw)
    fused2.load_state_dict(sd)
    assert fused2.state[fused2.param_groups[0]["params"][0]]["anchor"].dtype == torch.bfloat16


# ---------------------------------------------------------------- specific behaviours
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(FUSED))
def test_masked_elements_bit_identical(kind, device):
    kw = {**KIND_KW[kind], "weight_decay": 0.1, "l1": 0.01, "l2sp": 0.1, "grad_dropout": 0.1}
    ps = clones(make_params(device=device))
    masks = [torch.rand(p.shape, device=device) > 0.5 for p in ps]
    for p, m in zip(ps, masks):
        ftk.set_grad_mask(p, m)
    start = [p.detach().clone() for p in ps]
    opt = FUSED[kind](ps, **kw)
    for _ in range(20):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    for p, m, p0 in zip(ps, masks, start):
        assert torch.equal(p[~m], p0[~m])
        for k, v in opt.state[p].items():
            if k in ("exp_avg", "exp_avg_sq", "momentum_buffer", "square_avg", "grad_avg"):
                assert torch.all(v[~m] == 0), k
        if m.any() and p.numel() > 3:
            assert not torch.equal(p[m], p0[m])


def test_mask_broadcast_rows_and_round_trip():
    p = torch.nn.Parameter(torch.randn(5, 9))
    rows = torch.tensor([True, False, True, False, False]).unsqueeze(1)
    ftk.set_grad_mask(p, rows)
    assert torch.equal(ftk.get_grad_mask(p), rows.expand(5, 9))
    ftk.clear_grad_mask(p)
    assert ftk.get_grad_mask(p) is None


def test_mask_follows_channels_last_memory_order():
    w = torch.randn(4, 3, 2, 5).to(memory_format=torch.channels_last)
    p, r = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone().contiguous())
    m = torch.rand(w.shape) > 0.5
    ftk.set_grad_mask(p, m)
    ftk.set_grad_mask(r, m)
    assert torch.equal(ftk.get_grad_mask(p), m)
    g = torch.randn(w.shape)
    p.grad = g.clone().to(memory_format=torch.channels_last)
    r.grad = g.clone()
    FusedSGD([p], lr=0.1).step()
    FusedSGD([r], lr=0.1).step()
    assert torch.equal(p, r)


def test_grad_dropout_fraction_and_seed():
    n, pdrop = 65537, 0.3
    p = torch.nn.Parameter(torch.randn(n))
    start = p.detach().clone()
    p.grad = torch.ones(n)
    torch.manual_seed(3)
    FusedSGD([p], lr=1.0, grad_dropout=pdrop).step()
    moved = p != start
    kept = moved.float().mean().item()
    sigma = (pdrop * (1 - pdrop) / n) ** 0.5
    assert abs(kept - (1 - pdrop)) < 6 * sigma
    torch.testing.assert_close((start - p)[moved], torch.full((int(moved.sum()),), 1 / (1 - pdrop)))
    # same seed, same mask; another seed, another mask
    q = torch.nn.Parameter(start.clone())
    q.grad = torch.ones(n)
    torch.manual_seed(3)
    FusedSGD([q], lr=1.0, grad_dropout=pdrop).step()
    assert torch.equal(p, q)
    q2 = torch.nn.Parameter(start.clone())
    q2.grad = torch.ones(n)
    torch.manual_seed(4)
    FusedSGD([q2], lr=1.0, grad_dropout=pdrop).step()
    assert not torch.equal(p, q2)


def test_philox_reference_is_uniform():
    u = philox_uniform(12345, 7, 100003)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u, philox_uniform(12345, 8, 100003))


def test_l1_gives_exact_zeros():
    p = torch.nn.Parameter(torch.randn(4096) * 1e-3)
    r = torch.nn.Parameter(p.detach().double().clone())
    opt = FusedSGD([p], lr=0.1, l1=0.1)
    ref = ReferenceOptimizer("sgd", [r], lr=0.1, l1=0.1)
    for _ in range(3):
        g = torch.randn(4096) * 1e-3
        p.grad, r.grad = g.clone(), g.double()
        opt.step()
        ref.step()
    assert (p == 0).float().mean() > 0.9
    assert torch.equal(p == 0, r == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_amp_found_inf_skips_and_grad_scale_unscales(device):
    ps = clones(make_params(device=device))
    start = [p.detach().clone() for p in ps]
    opt = FusedAdamW(ps, **{**KIND_KW["adamw"], "lr": 1e-2})
    scale = torch.tensor(1024.0, device=device)
    for p in ps:
        p.grad = torch.randn_like(p) * 1024
    opt.grad_scale, opt.found_inf = scale, torch.tensor(1.0, device=device)
    opt.step()
    for p, p0 in zip(ps, start):
        assert torch.equal(p, p0)
        assert opt.state[p]["step"].item() == 0
    opt.found_inf = torch.tensor(0.0, device=device)
    pr = clones([p.cpu().double() for p in start])
    ref = ReferenceOptimizer("adamw", pr, **{**KIND_KW["adamw"], "lr": 1e-2})
    for a, b in zip(ps, pr):
        b.grad = a.grad.cpu().double()
    opt.step()
    ref.step(grad_scale=1024.0)
    for a, b in zip(ps, pr):
        assert opt.state[a]["step"].item() == 1
        assert rel_err(a.cpu(), b) <= 1e-5


def test_grad_scaler_integration():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    ref_model = copy.deepcopy(model)
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(16, 8), torch.randn(16, 3)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        ref.zero_grad()
        torch.nn.functional.mse_loss(ref_model(x), y).backward()
        ref.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(a, b) <= 1e-5


def test_grad_scaler_unscale_then_clip_then_step():
    """The AMP recipe with clipping (what Accelerate's ``clip_grad_norm_`` does under fp16):
    ``scaler.unscale_(opt)``, ``clip_grad_norm_``, ``scaler.step(opt)``. The step then sees grads that
    are already unscaled (GradScaler passes no scale) and still skips on the found inf. Same
    trajectory as torch's AdamW through the same recipe, an overflowing step included."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    ref_model = copy.deepcopy(model)
    pairs = []
    for m, cls in ((model, FusedAdamW), (ref_model, torch.optim.AdamW)):
        pairs.append((m, cls(m.parameters(), lr=1e-2), torch.amp.GradScaler("cpu", init_scale=2.0**10)))
    x, y = torch.randn(16, 8), torch.randn(16, 3)
    for i in range(5):
        for m, opt, scaler in pairs:
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if i == 2:
                m.weight.grad[0, 0] = float("inf")
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
            before = m.weight.detach().clone()
            scaler.step(opt)
            scaler.update()
            assert torch.equal(m.weight, before) == (i == 2)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(a, b) <= 1e-5
    assert pairs[0][2].get_scale() == pairs[1][2].get_scale() == 2.0**9


def test_nonfinite_grad_norm_skips_step():
    p = torch.nn.Parameter(torch.randn(10))
    p0 = p.detach().clone()
    p.grad = torch.randn(10)
    p.grad[3] = float("nan")
    opt = FusedAdamW([p], lr=1e-2, max_grad_norm=1.0)
    opt.step()
    assert torch.equal(p, p0) and opt.state[p]["step"].item() == 0


def test_tensor_lr_and_scheduler():
    ps = make_params()
    pa, pb = clones(ps), clones(ps)
    oa = FusedAdamW(pa, lr=torch.tensor(0.01))
    ob = FusedAdamW(pb, lr=0.01)
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=2, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=2, gamma=0.5)
    for _ in range(6):
        for a, b in zip(pa, pb):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        oa.step()
        ob.step()
        sa.step()
        sb.step()
    assert isinstance(oa.param_groups[0]["lr"], torch.Tensor)
    assert abs(oa.param_groups[0]["lr"].item() - 0.01 * 0.5**3) < 1e-9
    for a, b in zip(pa, pb):
        assert rel_err(a, b) <= 1e-6


def test_none_grads_skipped_and_noncontiguous_grads_handled():
    a, b = (torch.nn.Parameter(torch.randn(6, 4)) for _ in range(2))
    c = torch.nn.Parameter(a.detach().clone())
    b0 = b.detach().clone()
    g = torch.randn(4, 6).t()  # not contiguous
    a.grad = g
    c.grad = g.contiguous()
    opt = FusedAdamW([a, b, c], lr=0.1)
    opt.step()
    assert torch.equal(b, b0) and b not in opt.state
    assert torch.equal(a, c)


def test_param_groups_and_named_params():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    ref = copy.deepcopy(model)
    groups = [
        {"params": list(model[0].parameters()), "lr": 0.1, "weight_decay": 0.0},
        {"params": list(model[1].parameters()), "lr": 0.01},
    ]
    ref_groups = [
        {"params": list(ref[0].parameters()), "lr": 0.1, "weight_decay": 0.0},
        {"params": list(ref[1].parameters()), "lr": 0.01},
    ]
    opt, ropt = FusedAdamW(groups), torch.optim.AdamW(ref_groups)
    x = torch.randn(3, 4)
    for _ in range(4):
        for m, o in ((model, opt), (ref, ropt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert rel_err(a, b) <= 1e-6


# ---------------------------------------------------------------- bad input
def test_bad_input_errors():
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="shape"):
        ftk.set_grad_mask(p, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="torch.bool"):
        ftk.set_grad_mask(p, torch.ones(4, 4))
    with pytest.raises(ValueError, match="meta"):
        ftk.set_grad_mask(p, torch.ones(4, 4, dtype=torch.bool, device="meta"))
    for kw, what in [
        (dict(grad_dropout=1.0), "grad_dropout"),
        (dict(grad_dropout=-0.1), "grad_dropout"),
        (dict(l1=-1.0), "l1"),
        (dict(l2=-1.0), "l2"),
        (dict(l2sp=-1.0), "l2sp"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(lr=-1.0), "lr"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(betas=(1.0, 0.9)), "betas"),
    ]:
        with pytest.raises(ValueError, match=what):
            FusedAdamW([p], **kw)
    with pytest.raises(ValueError, match="Nesterov"):
        FusedSGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="Fisher"):
        FusedAdamW([p], ewc=0.1)
    with pytest.raises(ValueError, match="anchor"):
        FusedAdamW([p], l2sp=0.1, anchors={p: torch.zeros(3)})
    lin = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="'weight'"):
        FusedAdamW(lin.named_parameters(), ewc=0.1, fisher={})


def test_fisher_diagonal_matches_manual():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    batches = [(torch.randn(6, 5), torch.randint(0, 3, (6,))) for _ in range(3)]
    fisher = ftk.fisher_diagonal(model, batches)
    for name, p in model.named_parameters():
        acc = torch.zeros_like(p)
        for x, y in batches:
            g = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), p)[0]
            acc += g.square()
        torch.testing.assert_close(fisher[p], acc / 3, msg=name)
        assert p.grad is None
    opt = FusedAdamW(model.parameters(), ewc=1.0, fisher=fisher)
    assert set(opt.state) == set(model.parameters())


@pytest.mark.parametrize("kind", [FusedAdamW, FusedSGD])
def test_step_bumps_version_like_torch_in_place_ops(kind):
    """The kernel writes through raw pointers; the step tells autograd, so a graph that saved a
    param before the step refuses to backward after it (torch's optimizers behave the same)."""
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = kind([p], lr=0.1)
    p.grad = torch.randn_like(p)
    v = p._version
    opt.step()
    assert p._version > v
    x = torch.randn(2, 3, requires_grad=True)
    y = (x @ p.t()).square().sum()  # saves p
    p.grad = torch.randn_like(p)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.cuda
def test_cuda_graph_replays_own_metadata_and_redraws_grad_dropout():
    """A step captured in a CUDA graph re-reads its pinned metadata at each replay: another
    optimizer's eager steps between replays (same sizes, so the pinned allocator would hand them the
    same block) must not redirect the replay. Gradient dropout draws a new mask at each replay."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    sizes = [(1023,), (7, 13), (65537,)]
    p = [torch.nn.Parameter(t) for t in make_params(device=dev, sizes=sizes)]
    other = [torch.nn.Parameter(t) for t in make_params(device=dev, sizes=sizes)]
    ref = clones([t.detach() for t in p])
    grads = [torch.randn_like(t) for t in p]
    for t, g in zip(p, grads):
        t.grad = g
    opt, opt_ref, opt_other = (FusedAdamW(ps, lr=1e-2) for ps in (p, ref, other))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()  # warm-up: state created outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        for t in other:
            t.grad = torch.randn_like(t)
        opt_other.step()  # frees and reuses pinned metadata blocks of the captured sizes
        other_before = [t.detach().clone() for t in other]
        graph.replay()
        torch.cuda.synchronize()
        for t, b in zip(other, other_before):
            assert torch.equal(t, b), "a replay stepped the other optimizer's params"
    for t, g in zip(ref, grads):
        t.grad = g
    for _ in range(4):  # warm-up + 3 replays
        opt_ref.step()
    for a, b in zip(p, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)

    q = torch.nn.Parameter(torch.randn(4096, device=dev))
    q.grad = torch.randn_like(q) + 3.0  # never 0: a zero step means dropped
    sgd = FusedSGD([q], lr=1.0, grad_dropout=0.5)
    with torch.cuda.stream(side):
        sgd.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sgd.step()
    kept = []
    for _ in range(2):
        before = q.detach().clone()
        graph.replay()
        torch.cuda.synchronize()
        kept.append(q.detach() != before)
    for k in kept:
        assert 0.4 < k.float().mean().item() < 0.6
    assert not torch.equal(kept[0], kept[1]), "each replay must draw a new gradient-dropout mask"
