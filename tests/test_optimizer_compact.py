"""Compact optimizer state for sparse masks: the same trajectory as the dense masked state, bit for
bit, with state memory scaling with the kept fraction; state dicts and mask changes move between
the layouts without losing kept elements' state."""

import copy

import pytest
import torch

import ftkernels as ftk

CUDA = torch.cuda.is_available()
KINDS = {
    "adamw": ("FusedAdamW", dict(lr=1e-2, weight_decay=0.1, l1=1e-3, l2sp=0.1, max_grad_norm=2.0, amsgrad=True)),
    "sgd": ("FusedSGD", dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "adagrad": ("FusedAdagrad", dict(lr=1e-2, initial_accumulator_value=0.1)),
    "rmsprop": ("FusedRMSprop", dict(lr=1e-2, momentum=0.5, centered=True)),
}


def _params(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(67, 33), (129,), (8, 3, 3, 3)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def _mask(params, keep, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        ftk.set_grad_mask(p, ftk.masks.random(p.detach().cpu(), keep, generator=g).to(p.device))


def _opt(kind, params, threshold):
    name, kw = KINDS[kind]
    opt = getattr(ftk.optim, name)(params, **kw)
    opt.compact_threshold = threshold
    return opt


def _steps(opt, params, n, seed=5):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.device)
        opt.step()


def _state_bytes(opt):
    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for k, v in st.items()
        if isinstance(v, torch.Tensor) and k not in ("anchor", "fisher", "step")
    )


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("keep", [0.01, 0.1, 0.4])
def test_same_trajectory_as_dense_masked_state_with_less_memory(kind, keep):
    runs = {}
    for threshold in (0.5, 0.0):  # compact, dense masked
        params = _params()
        start = [p.detach().clone() for p in params]
        _mask(params, keep)
        opt = _opt(kind, params, threshold)
        _steps(opt, params, 12)
        runs[threshold] = (params, opt)
        for p, p0 in zip(params, start, strict=True):
            frozen = ~ftk.get_grad_mask(p)
            assert torch.equal(p.detach()[frozen], p0[frozen])
            assert not torch.equal(p.detach()[~frozen], p0[~frozen])
    (pc, oc), (pd, od) = runs[0.5], runs[0.0]
    for a, b in zip(pc, pd, strict=True):
        assert torch.equal(a, b)
        assert "compact_index" in oc.state[a] and "compact_index" not in od.state[b]
    dense, compact = _state_bytes(od), _state_bytes(oc)
    # per kept element: the slots in the param's dtype plus a 4-byte index; rounding of the kept count
    kept = sum(int(ftk.get_grad_mask(p).sum()) for p in pc)
    slots = dense // sum(p.numel() * p.element_size() for p in pd)
    assert compact == kept * (4 * slots + 4)
    assert compact < (1.0 / slots + 1) * (keep + 0.01) * dense


@pytest.mark.parametrize("kind", ["adamw", "rmsprop"])
def test_state_dict_round_trips_between_layouts(kind):
    params = _params()
    _mask(params, 0.2)
    opt = _opt(kind, params, 0.5)
    _steps(opt, params, 4)
    saved_params = [p.detach().clone() for p in params]
    sd = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors
    _steps(opt, params, 4, seed=9)
    want = [p.detach().clone() for p in params]
    for threshold in (0.5, 0.0):  # loaded by a compact optimizer, and by one that keeps it dense
        fresh = _params()
        with torch.no_grad():
            for f, s in zip(fresh, saved_params, strict=True):
                f.copy_(s)
        _mask(fresh, 0.2)
        opt2 = _opt(kind, fresh, threshold)
        opt2.load_state_dict(copy.deepcopy(sd))  # as in torch, loaded tensors may alias the dict's
        _steps(opt2, fresh, 4, seed=9)
        for f, w in zip(fresh, want, strict=True):
            assert torch.equal(f, w)
        assert ("compact_index" in opt2.state[fresh[0]]) == (threshold > 0)


def test_mask_changes_keep_kept_state():
    # A growing mask, then none: the dense masked run never touched the newly kept elements'
    # state (zeros), which is where the compact layout starts them, so the runs stay identical.
    runs = []
    for threshold in (0.5, 0.0):
        params = _params()
        g = torch.Generator().manual_seed(3)
        scores = [torch.rand(p.shape, generator=g) for p in params]
        for p, sc in zip(params, scores, strict=True):
            ftk.set_grad_mask(p, sc < 0.1)
        opt = _opt("adamw", params, threshold)
        _steps(opt, params, 3)
        for p, sc in zip(params, scores, strict=True):
            ftk.set_grad_mask(p, sc < 0.3)
        _steps(opt, params, 3, seed=6)
        for p in params:
            ftk.clear_grad_mask(p)
        _steps(opt, params, 3, seed=7)
        runs.append((params, opt))
    for a, b in zip(runs[0][0], runs[1][0], strict=True):
        assert torch.equal(a, b)
        st = runs[0][1].state[a]
        assert "compact_index" not in st and st["exp_avg"].shape == a.shape


def test_dense_fallbacks():
    params = _params()
    _mask(params, 0.1)
    opt = ftk.optim.FusedAdamW(params, lr=1e-2, grad_dropout=0.1)  # Philox keyed by the full index
    _steps(opt, params, 1)
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in params)
    params = _params()
    _mask(params, 0.6)  # above the threshold
    opt = ftk.optim.FusedAdamW(params, lr=1e-2)
    _steps(opt, params, 1)
    assert all("compact_index" not in opt.state[p] for p in params)
    params = _params()
    p = params[0]
    t = torch.nn.Parameter(p.detach().t().contiguous().t())  # not contiguous
    ftk.set_grad_mask(t, torch.rand(t.shape) < 0.1)
    opt = ftk.optim.FusedAdamW([t], lr=1e-2)
    t.grad = torch.randn_like(t)
    opt.step()
    assert opt.state[t]["exp_avg"].shape == t.shape


@pytest.mark.cuda
@pytest.mark.parametrize("kind", list(KINDS))
def test_cuda_same_trajectory(kind):
    runs = []
    for threshold in (0.5, 0.0):
        params = _params("cuda")
        _mask(params, 0.1)
        opt = _opt(kind, params, threshold)
        _steps(opt, params, 6)
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_kernel_rejects_inconsistent_compact_args():
    """The extension's own checks on ``OptimArgs.indices`` (memory safety: the kernel indexes params
    through it): state of another length, a float index, an index with a mask."""
    from ftkernels._ext import C

    opt = ftk.optim.FusedAdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-2)  # for its hyper bundle
    p = torch.randn(40)
    idx = torch.tensor([1, 5, 9, 30], dtype=torch.int32)

    def args(state_len=4, index=idx, mask=None):
        a = C().OptimArgs()
        a.hyper = opt._hyper(opt.param_groups[0])
        a.params, a.grads, a.steps, a.tensor_ids = [p], [torch.randn(40)], [torch.zeros(())], [0]
        a.s1, a.s2 = [torch.zeros(state_len)], [torch.zeros(state_len)]
        a.indices, a.masks = [index], [mask]
        return a

    before = p.clone()
    C().fused_optim_step(args())  # consistent: steps exactly the indexed elements
    changed = (p != before).nonzero().flatten()
    assert torch.equal(changed, idx.long())
    with pytest.raises(RuntimeError, match="one element per index"):
        C().fused_optim_step(args(state_len=5))
    with pytest.raises(RuntimeError, match="int32/int64"):
        C().fused_optim_step(args(index=idx.float()))
    with pytest.raises(RuntimeError, match="excludes masks"):
        C().fused_optim_step(args(mask=torch.full((5,), 255, dtype=torch.uint8)))
