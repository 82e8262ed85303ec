"""``ftkernels.graphed_train_step``: a whole training step captured in a CUDA graph.

On CPU every call is eager (tested against a hand-written loop, bit for bit). The capture logic
(static buffers, lr tensors, re-captures, eager fallbacks) is tested on CPU too, with the CUDA
graph replaced by a recorder whose replay runs the captured program again: the same Python around
it, so the bookkeeping is checked without a GPU. ``cuda`` tests use real graphs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ftkernels as ftk
from ftkernels import graphed_step as gs
from ftkernels.optim import FusedAdamW


def _model(seed=0, device="cpu", dropout=0.0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 5)).to(device)
    model = ftk.apply_lora(base, ["0", "2"], r=3, dropout=dropout)
    for m in model.modules():
        if isinstance(m, ftk.nn.LoRALinear):
            nn.init.normal_(m.lora_B, std=0.2)  # B = 0 would make A's first grads zero
    return model


def _opt(model, **kw):
    return FusedAdamW([p for p in model.parameters() if p.requires_grad], lr=kw.pop("lr", 1e-2), **kw)


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def _batches(n, rows=8, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        {"x": torch.randn(rows, 12, generator=g).to(device), "y": torch.randint(0, 5, (rows,), generator=g).to(device)}
        for _ in range(n)
    ]


def _hand_loop(model, opt, batches, sched=None, each=None, scaler=None):
    losses = []
    for i, b in enumerate(batches):
        if each is not None:
            each(i, opt)
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, b)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.detach())
    return losses


# A replayed step reads lr from an fp32 device tensor (as torch's capturable optimizers do), the eager
# one the Python float: 0.01 differs in the 9th digit, which flips the last bit of a weight now and then.
_LR_TOL = dict(atol=1e-6, rtol=1e-6)


def _assert_same_params(a, b, **tol):
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb
        if tol:
            torch.testing.assert_close(pa, pb, **tol)
        else:
            assert torch.equal(pa, pb), na


class _Recorder:
    """A stand-in for ``torch.cuda.CUDAGraph``: recording runs nothing (as a capture), a replay runs
    the captured program with grads set to None first (what a replay of a step captured after
    ``zero_grad(set_to_none=True)`` amounts to) and writes the loss into the captured loss tensor."""

    def __init__(self, program, owner):
        self.program, self.owner, self.loss = program, owner, torch.zeros(())

    def replay(self):
        self.owner._zero_grad()
        self.loss.copy_(self.program().detach())


@pytest.fixture
def fake_graphs(monkeypatch):
    """Graph mode on CPU through :class:`_Recorder`; yields a list of the recorders made."""
    made = []

    def record(self, program):
        rec = _Recorder(program, self)
        made.append(rec)
        return rec, rec.loss

    monkeypatch.setattr(gs, "_graph_device", lambda model, opt: torch.device("cpu"))
    monkeypatch.setattr(gs.GraphedTrainStep, "_record", record)
    return made


# ---------------------------------------------------------------------------------------- eager (CPU)
def test_cpu_runs_every_step_eagerly_like_a_hand_loop():
    batches = _batches(5)
    m1, m2 = _model(), _model()
    o1, o2 = _opt(m1), _opt(m2)
    step = ftk.graphed_train_step(m1, o1, _loss)
    got = [step(b) for b in batches]
    want = _hand_loop(m2, o2, batches)
    assert not step.graphed and step.stats == {"eager": 5, "replays": 0, "captures": 0}
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not any(g.requires_grad for g in got)
    _assert_same_params(m1, m2)


def test_bad_arguments_are_named():
    m = _model()
    o = _opt(m)
    with pytest.raises(ValueError, match="one CUDA device"):
        ftk.graphed_train_step(m, o, _loss, enabled=True)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="warmup"):
            ftk.graphed_train_step(m, o, _loss, warmup=bad)
    with pytest.raises(ValueError, match="enabled"):
        ftk.graphed_train_step(m, o, _loss, enabled="yes")
    with pytest.raises(TypeError, match="loss_fn"):
        ftk.graphed_train_step(m, o, "loss")
    with pytest.raises(TypeError, match="optimizer"):
        ftk.graphed_train_step(m, object(), _loss)
    with pytest.raises(TypeError, match="nn.Module"):
        ftk.graphed_train_step(lambda x: x, o, _loss)
    with pytest.raises(ValueError, match="needs an optimizer"):
        ftk.graphed_train_step(m, None, _loss, grad_scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="GradScaler"):
        ftk.graphed_train_step(m, o, _loss, grad_scaler=object())
    step = ftk.graphed_train_step(m, o, lambda model, b: model(b["x"]))  # not a scalar loss
    with pytest.raises(TypeError, match="one-element loss"):
        step(_batches(1)[0])


def test_step_keeps_what_the_graph_writes_alive():
    """The two-graph failure of 2026-11-23: a graph outliving its optimizer replays into freed
    memory. The step holds model and optimizer."""
    import gc
    import weakref

    m = _model()
    o = _opt(m)
    ref = weakref.ref(o)
    step = ftk.graphed_train_step(m, o, _loss)
    del o
    gc.collect()
    assert ref() is step.optimizer


# ---------------------------------------------------------------------------------------- capture logic
def test_replays_follow_new_batches_like_eager(fake_graphs):
    batches = _batches(7)
    m1, m2 = _model(), _model()
    o1, o2 = _opt(m1), _opt(m2)
    step = ftk.graphed_train_step(m1, o1, _loss, warmup=2)
    got = [step(b) for b in batches]
    want = _hand_loop(m2, o2, batches)
    assert step.graphed and step.stats == {"eager": 2, "replays": 5, "captures": 1}
    assert len(fake_graphs) == 1
    torch.testing.assert_close(torch.stack(got), torch.stack(want), **_LR_TOL)
    _assert_same_params(m1, m2, **_LR_TOL)
    assert step._static["x"] is not batches[2]["x"]  # the graph reads its own buffers
    got[-1].add_(1.0)  # a returned loss is the caller's: the next replay leaves it alone
    step(batches[0])
    torch.testing.assert_close(got[-1], want[-1] + 1.0, **_LR_TOL)


def test_learning_rate_schedules_reach_the_graph(fake_graphs):
    """Schedulers assign floats to group["lr"]; the graph reads a device tensor refreshed per call.
    The user's param groups keep their float."""
    batches = _batches(8)
    m1, m2 = _model(), _model()
    o1, o2 = _opt(m1), _opt(m2)
    s1 = torch.optim.lr_scheduler.LambdaLR(o1, lambda i: 1.0 / (1 + i))
    s2 = torch.optim.lr_scheduler.LambdaLR(o2, lambda i: 1.0 / (1 + i))
    step = ftk.graphed_train_step(m1, o1, _loss, warmup=1)
    for b in batches:
        step(b)
        s1.step()
    _hand_loop(m2, o2, batches, sched=s2)
    assert step.stats["replays"] == 7 and step.stats["captures"] == 1
    assert isinstance(o1.param_groups[0]["lr"], float)
    _assert_same_params(m1, m2, **_LR_TOL)
    # plain assignment of a new value is followed too
    o1.param_groups[0]["lr"] = 0.0
    before = [p.clone() for p in m1.parameters()]
    step(batches[0])
    assert all(torch.equal(a, b) for a, b in zip(before, m1.parameters()))


def test_a_batch_unlike_the_captured_one_runs_eagerly(fake_graphs):
    batches = _batches(4)
    small = _batches(1, rows=3, seed=5)[0]
    m1, m2 = _model(), _model()
    o1, o2 = _opt(m1), _opt(m2)
    step = ftk.graphed_train_step(m1, o1, _loss, warmup=1)
    step(batches[0])
    step(batches[1])  # captured here
    with pytest.warns(UserWarning, match=r"batch\['x'\]: \(3, 12\)"):
        step(small)
    step(batches[2])  # the graph is still there
    _hand_loop(m2, o2, [batches[0], batches[1], small, batches[2]])
    assert step.stats == {"eager": 2, "replays": 2, "captures": 1}
    _assert_same_params(m1, m2, **_LR_TOL)
    with pytest.warns(UserWarning, match="keys"):
        step(dict(batches[3], extra=1))
    # the eager call then meets the model's own check, as a hand loop would
    with pytest.warns(UserWarning, match="float64"), pytest.raises(TypeError, match="must match"):
        step({"x": batches[3]["x"].double(), "y": batches[3]["y"]})


def test_non_tensor_values_of_the_batch_must_match(fake_graphs):
    m = _model()
    o = _opt(m)
    seen = []

    def loss_fn(model, b):
        seen.append(b["scale"])
        return _loss(model, b) * b["scale"]

    step = ftk.graphed_train_step(m, o, loss_fn, warmup=1)
    b = dict(_batches(1)[0], scale=2.0)
    step(b)
    step(b)
    step(b)
    with pytest.warns(UserWarning, match="scale"):
        step(dict(b, scale=3.0))
    assert seen[-1] == 3.0 and step.stats["eager"] == 2


def test_loss_fn_may_change_the_batch_it_is_given(fake_graphs):
    """HF-style code pops labels from its inputs: the captured structure stays whole."""
    m1, m2 = _model(), _model()
    o1, o2 = _opt(m1), _opt(m2)

    def popping(model, b):
        y = b.pop("y")
        return nn.functional.cross_entropy(model(b["x"]), y)

    batches = _batches(5)
    step = ftk.graphed_train_step(m1, o1, popping, warmup=1)
    for b in batches:
        step(dict(b))
    _hand_loop(m2, o2, batches)
    assert step.stats == {"eager": 1, "replays": 4, "captures": 1}
    _assert_same_params(m1, m2, **_LR_TOL)


def test_changes_the_graph_cannot_follow_recapture(fake_graphs):
    batches = _batches(9)
    m1, m2 = _model(), _model()
    o1, o2 = _opt(m1), _opt(m2)
    step = ftk.graphed_train_step(m1, o1, _loss, warmup=1)

    def change(i, opt):
        if i == 3:
            opt.param_groups[0]["weight_decay"] = 0.3
        if i == 5:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))

    for i, b in enumerate(batches):
        change(i, o1)
        step(b)
    _hand_loop(m2, o2, batches, each=change)
    assert step.stats["captures"] == 3 and step.stats["eager"] == 1
    _assert_same_params(m1, m2, **_LR_TOL)
    m1.eval()
    step(batches[0])
    assert step.stats["captures"] == 4
    # a change arriving with an unusual batch: that call is eager, the next usual one captures
    o1.param_groups[0]["weight_decay"] = 0.1
    with pytest.warns(UserWarning, match="runs eagerly"):
        step(_batches(1, rows=3)[0])
    assert not step.graphed
    step(batches[1])
    assert step.graphed and step._static["x"].shape == (8, 12) and step.stats["captures"] == 5


def test_a_hyperparameter_changing_every_step_goes_eager(fake_graphs):
    """OneCycleLR-like momentum cycling: each change needs a capture; after a few the step stops
    capturing, warned, and stays right."""
    batches = _batches(10)
    m1, m2 = _model(), _model()
    o1, o2 = _opt(m1), _opt(m2)

    def cycle(i, opt):
        opt.param_groups[0]["betas"] = (0.85 + 0.01 * i, 0.999)

    step = ftk.graphed_train_step(m1, o1, _loss, warmup=1)
    with pytest.warns(UserWarning, match="every call runs eagerly"):
        for i, b in enumerate(batches):
            cycle(i, o1)
            step(b)
    _hand_loop(m2, o2, batches, each=cycle)
    assert step.stats["captures"] == 3 and not step.graphed
    _assert_same_params(m1, m2, **_LR_TOL)


def test_a_failed_capture_falls_back_or_raises(monkeypatch):
    monkeypatch.setattr(gs, "_graph_device", lambda model, opt: torch.device("cpu"))

    def broken(self, program):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(gs.GraphedTrainStep, "_record", broken)
    batches = _batches(4)
    m1, m2 = _model(), _model()
    o1, o2 = _opt(m1), _opt(m2)
    step = ftk.graphed_train_step(m1, o1, _loss, warmup=1)
    with pytest.warns(UserWarning, match="could not be captured.*not permitted"):
        for b in batches:
            step(b)
    _hand_loop(m2, o2, batches)
    assert step.stats == {"eager": 4, "replays": 0, "captures": 0}
    _assert_same_params(m1, m2, **_LR_TOL)
    strict = ftk.graphed_train_step(_model(), _opt(_model()), _loss, warmup=1, enabled=True)
    strict(batches[0])
    with pytest.raises(RuntimeError, match="not permitted"):
        strict(batches[1])


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "recorded"])
def test_grad_scaler_steps_like_a_hand_loop(graphs, request):
    """fp16-AMP style: scale, step, update inside the step; the scale grows and a step whose grads
    overflow is skipped, as in a hand-written loop."""
    if graphs:
        request.getfixturevalue("fake_graphs")
    batches = _batches(8)
    batches[5] = dict(batches[5], x=batches[5]["x"] * float("inf"))  # an overflowing step: skipped
    m1, m2 = _model(), _model()
    o1, o2 = _opt(m1), _opt(m2)
    sc1 = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    sc2 = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    step = ftk.graphed_train_step(m1, o1, _loss, warmup=2, grad_scaler=sc1)
    for b in batches:
        step(b)
    _hand_loop(m2, o2, batches, scaler=sc2)
    assert step.stats["captures"] == (1 if graphs else 0)
    assert sc1.get_scale() == sc2.get_scale() != 2.0**8
    _assert_same_params(m1, m2, **_LR_TOL)
    assert all(torch.isfinite(p).all() for p in m1.parameters())


def test_forward_backward_only_without_an_optimizer(fake_graphs):
    m = _model()
    step = ftk.graphed_train_step(m, None, _loss, warmup=1)
    b = _batches(3)
    for x in b:
        step(x)
    ref = _model()
    _loss(ref, b[2]).backward()
    for p, q in zip(m.parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------- real graphs
@pytest.mark.cuda
@pytest.mark.parametrize("opt_kind", ["fused", "torch"])
def test_cuda_graph_trains_like_eager(opt_kind):
    """Real CUDA graph: rotating batches, an lr schedule, a smaller last batch (eager) and the
    graph's grads shown on the params again after it."""
    dev = torch.device("cuda")
    batches = _batches(9, device=dev) + _batches(1, rows=3, device=dev, seed=7) + _batches(2, device=dev, seed=8)
    m1, m2 = _model(device=dev), _model(device=dev)

    def make(m):
        params = [p for p in m.parameters() if p.requires_grad]
        if opt_kind == "fused":
            return FusedAdamW(params, lr=1e-2, weight_decay=0.01)
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, fused=True, capturable=True)

    o1, o2 = make(m1), make(m2)
    s1 = torch.optim.lr_scheduler.LambdaLR(o1, lambda i: 1.0 / (1 + i))
    s2 = torch.optim.lr_scheduler.LambdaLR(o2, lambda i: 1.0 / (1 + i))
    step = ftk.graphed_train_step(m1, o1, _loss, warmup=2, enabled=True)
    got = []
    with pytest.warns(UserWarning, match="runs eagerly"):
        for b in batches:
            got.append(step(b))
            s1.step()
    want = _hand_loop(m2, o2, batches, sched=s2)
    torch.cuda.synchronize()
    assert step.stats == {"eager": 3, "replays": 9, "captures": 1}
    torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=1e-5, rtol=1e-5)
    _assert_same_params(m1, m2, atol=1e-5, rtol=1e-5)
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        if p.requires_grad:
            assert p.grad is step._grads[[id(x) for x, _ in step._grads].index(id(p))][1], n
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_graph_with_lora_dropout_draws_new_masks():
    """Dropout seeds are drawn on the device inside the graph: each replay draws new masks."""
    dev = torch.device("cuda")
    m = _model(device=dev, dropout=0.5)
    o = _opt(m, lr=0.0)  # nothing moves: the loss changes only through the masks
    b = _batches(1, device=dev)[0]
    step = ftk.graphed_train_step(m, o, _loss, warmup=1, enabled=True)
    losses = torch.stack([step(b) for _ in range(6)])
    assert step.stats["replays"] == 5
    assert len(set(losses[1:].tolist())) > 1


@pytest.mark.cuda
def test_cuda_graph_with_grad_scaler_fp16_autocast():
    """fp16 autocast + GradScaler + FusedAdamW captured: no host sync in scale/step/update."""
    dev = torch.device("cuda")
    m1, m2 = _model(device=dev), _model(device=dev)
    o1, o2 = _opt(m1), _opt(m2)
    sc1, sc2 = torch.amp.GradScaler("cuda", growth_interval=2), torch.amp.GradScaler("cuda", growth_interval=2)

    def amp_loss(model, b):
        with torch.autocast("cuda", dtype=torch.float16):
            return _loss(model, b)

    batches = _batches(8, device=dev)
    step = ftk.graphed_train_step(m1, o1, amp_loss, warmup=2, enabled=True, grad_scaler=sc1)
    for b in batches:
        step(b)
    for b in batches:
        o2.zero_grad(set_to_none=True)
        sc2.scale(amp_loss(m2, b)).backward()
        sc2.step(o2)
        sc2.update()
    assert step.stats["replays"] == 6 and sc1.get_scale() == sc2.get_scale()
    _assert_same_params(m1, m2, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_non_capturable_torch_optimizer_warns_and_trains():
    dev = torch.device("cuda")
    m1, m2 = _model(device=dev), _model(device=dev)
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    o1, o2 = torch.optim.AdamW(params(m1), lr=1e-2), torch.optim.AdamW(params(m2), lr=1e-2)
    batches = _batches(4, device=dev)
    step = ftk.graphed_train_step(m1, o1, _loss, warmup=1)
    with pytest.warns(UserWarning, match="could not be captured"):
        for b in batches:
            step(b)
    _hand_loop(m2, o2, batches)
    _assert_same_params(m1, m2, atol=1e-6, rtol=1e-6)
