"""The layers under torch.func transforms and forward-mode AD (ftkernels/ops/torch_func.py): grads,
per-sample grads, Jacobians, JVPs and Hessians equal those of the fused eager path or of the
plain-PyTorch reference, dropout's stream included (float64, CPU)."""

import copy
import re

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import ftkernels as ftk
from ftkernels import masks
from ftkernels.nn import (
    LoRAConv1D,
    LoRAConv1d,
    LoRAConv2d,
    LoRAConv3d,
    LoRAEmbedding,
    LoRALinear,
    LoRAMultiheadAttention,
    LoReFT,
    MaskedConv2d,
    MaskedLinear,
)
from ftkernels.nn.reference import lora_linear_reference
from ftkernels.ops import torch_func

F64 = torch.float64


def _hf_conv1d():
    from transformers.pytorch_utils import Conv1D

    return LoRAConv1D(Conv1D(7, 9), r=3, dropout=0.25)


def _masked(kind):
    m = MaskedLinear(40, 36)
    mask = {
        "rows": lambda: masks.rows(m.weight, 0.4),
        "elements": lambda: torch.rand(36, 40) > 0.5,
        "blocks": lambda: masks.blocks(m.weight, 0.5, block=16),
    }[kind]()
    m.set_mask(mask)
    assert m.plan["kind"] == kind
    return m


def _masked_conv():
    m = MaskedConv2d(3, 5, 3, padding=1)
    m.set_mask(torch.rand_like(m.weight) > 0.5)
    return m


# name -> (layer builder, input shape; None: token ids)
LAYERS = {
    "linear": (lambda: LoRALinear(nn.Linear(9, 7), r=3), (2, 5, 9)),
    "linear_dropout": (lambda: LoRALinear(nn.Linear(9, 7), r=3, dropout=0.3), (2, 5, 9)),
    "hf_conv1d_dropout": (_hf_conv1d, (5, 9)),
    "dora": (lambda: LoRALinear(nn.Linear(9, 7), r=3, dora=True), (5, 9)),
    "dora_dropout": (lambda: LoRALinear(nn.Linear(9, 7), r=3, dora=True, dropout=0.3), (5, 9)),
    "conv2d": (lambda: LoRAConv2d(nn.Conv2d(3, 6, 3, stride=2, padding=1), r=2), (2, 3, 7, 7)),
    "conv2d_dropout_groups": (lambda: LoRAConv2d(nn.Conv2d(4, 6, 3, groups=2), r=2, dropout=0.2), (2, 4, 6, 5)),
    "conv2d_dora_dropout": (lambda: LoRAConv2d(nn.Conv2d(3, 4, 3), r=2, dora=True, dropout=0.2), (2, 3, 6, 6)),
    "conv1d_dropout": (lambda: LoRAConv1d(nn.Conv1d(3, 4, 3), r=2, dropout=0.2), (2, 3, 9)),
    "conv3d": (lambda: LoRAConv3d(nn.Conv3d(2, 3, 2), r=2), (1, 2, 4, 3, 5)),
    "embedding": (lambda: LoRAEmbedding(nn.Embedding(11, 6), r=2), None),
    "mha_dropout": (
        lambda: LoRAMultiheadAttention(nn.MultiheadAttention(8, 2, batch_first=True), r=2, dropout=0.25),
        (2, 3, 8),
    ),
    "masked_rows": (lambda: _masked("rows"), (4, 40)),
    "masked_elements": (lambda: _masked("elements"), (4, 40)),
    "masked_blocks": (lambda: _masked("blocks"), (4, 40)),
    "masked_conv": (_masked_conv, (2, 3, 5, 5)),
    "loreft": (lambda: LoReFT(9, 3), (2, 4, 9)),
    "loreft_dropout": (lambda: LoReFT(9, 3, dropout=0.3), (2, 4, 9)),
}


def _layer(name):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make().to(F64)
    with torch.no_grad():
        for p in layer.parameters():  # LoRA B starts at zero: move every parameter off its init
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randint(0, 11, (2, 5)) if shape is None else torch.randn(shape, dtype=F64)
    return layer, x


def _loss(layer, params, x):
    out = functional_call(layer, params, (x, x, x) if isinstance(layer, LoRAMultiheadAttention) else (x,))
    out = out[0] if isinstance(out, tuple) else out
    return out.pow(3).sum()


def _trainable(layer):
    return {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}


def _eager_grads(layer, x, seed):
    """The fused path's grads of the same loss (no transform), the dropout seed drawn after manual_seed(seed)."""
    layer.zero_grad()
    torch.manual_seed(seed)
    _loss(layer, dict(layer.named_parameters()), x).backward()
    return {k: v.grad for k, v in layer.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("name", list(LAYERS))
def test_grad_transform_equals_the_fused_path(name, lora_node):
    layer, x = _layer(name)
    want = _eager_grads(layer, x, seed=7)
    torch.manual_seed(7)
    got = grad(lambda p: _loss(layer, p, x))(_trainable(layer))
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-10, msg=k)
    if name.startswith("masked"):  # trained only where the mask says
        keep = ftk.get_grad_mask(layer.weight)
        assert got["weight"][~keep].abs().max() == 0 and got["weight"][keep].abs().min() > 0


@pytest.mark.parametrize("name", ["linear_dropout", "conv2d_dropout_groups", "loreft_dropout", "masked_rows"])
def test_vmap_per_sample_grads_equal_one_call_per_sample(name):
    """randomness="same": each sample's dropout mask is the one a lone call on that sample with the
    same seed draws."""
    layer, x = _layer(name)
    torch.manual_seed(3)
    per_sample = vmap(grad(lambda p, xi: _loss(layer, p, xi[None])), in_dims=(None, 0), randomness="same")
    got = per_sample(_trainable(layer), x)
    for i in range(x.shape[0]):
        want = _eager_grads(layer, x[i : i + 1], seed=3)
        for k in want:
            torch.testing.assert_close(got[k][i], want[k], rtol=1e-10, atol=1e-10, msg=f"{k}[{i}]")


def test_vmap_dropout_randomness_modes():
    layer, x = _layer("linear_dropout")
    xs = x[:1].expand(4, *x.shape[1:])  # four identical samples
    params = _trainable(layer)

    def per_sample(rnd):
        return vmap(grad(lambda p, xi: _loss(layer, p, xi)), in_dims=(None, 0), randomness=rnd)(params, xs)["lora_A"]

    same, different = per_sample("same"), per_sample("different")
    for s in same[1:]:
        torch.testing.assert_close(s, same[0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(different[0], different[1])  # a seed per sample: other masks
    with pytest.raises(RuntimeError, match="randomness"):  # vmap's default, as for torch's dropout
        per_sample("error")
    layer.eval()  # no dropout: no random draw, any mode works
    assert torch.isfinite(per_sample("error")).all()


def test_jacobians_jvp_and_forward_ad_equal_the_reference():
    layer, x = _layer("linear")
    w, b, a, bb, s = layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B, layer.scaling

    def ref(xx):
        return lora_linear_reference(xx, w, b, a, bb, s)

    xi = x[0, :3]
    j_ref = jacrev(ref)(xi)
    torch.testing.assert_close(jacrev(layer)(xi), j_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jacfwd(layer)(xi), j_ref, rtol=1e-12, atol=1e-12)
    v = torch.randn_like(xi)
    y, t = jvp(layer, (xi,), (v,))
    torch.testing.assert_close(y, ref(xi))
    torch.testing.assert_close(t, torch.einsum("mnkl,kl->mn", j_ref, v), rtol=1e-12, atol=1e-12)
    with fwad.dual_level():  # forward AD without torch.func
        out = layer(fwad.make_dual(xi, v))
        torch.testing.assert_close(fwad.unpack_dual(out).tangent, t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["linear_dropout", "conv2d_dropout_groups", "loreft"])
def test_hessian_equals_the_plain_composition(name):
    """Second order (which the fused nodes refuse): the Hessian in the adapter's first parameter
    against finite differences of the first-order grads of the fused path."""
    layer, x = _layer(name)
    params = _trainable(layer)
    key = next(iter(params))

    def loss_of(t):
        torch.manual_seed(11)  # the same dropout mask on every evaluation
        return _loss(layer, {**params, key: t}, x)

    # hessian is jacfwd(jacrev): jacfwd vmaps, and dropout's draw needs a randomness mode there
    hess = jacfwd(jacrev(loss_of), randomness="same") if "dropout" in name else hessian(loss_of)
    h = hess(params[key]).reshape(params[key].numel(), -1)
    eps, p0 = 1e-6, params[key]
    for j in range(0, p0.numel(), max(1, p0.numel() // 4)):  # a few columns by central differences
        d = torch.zeros_like(p0).view(-1)
        d[j] = eps
        gp = grad(loss_of)(p0 + d.view_as(p0))
        gm = grad(loss_of)(p0 - d.view_as(p0))
        torch.testing.assert_close(h[:, j], ((gp - gm) / (2 * eps)).reshape(-1), rtol=1e-5, atol=1e-6)


def test_grouped_siblings_run_alone_under_a_transform(lora_node):
    """q/k/v grouped into one node in eager mode: under grad each runs in plain ops, same result."""

    class Attn(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, x):
            return torch.tanh(self.q(x)) * self.v(x) + self.k(x)

    torch.manual_seed(0)
    model = ftk.apply_lora(Attn(8).to(F64), ["q", "k", "v"], r=2, dropout=0.2)
    for m in ftk.peft_compat.lora_modules(model).values():
        nn.init.normal_(m.lora_B)
    x = torch.randn(3, 8, dtype=F64)
    for seed in range(3):  # the group learns its run, then fuses
        want = _eager_grads(model, x, seed)
    assert model.q._lora_group is not None and model.q._lora_group.order is not None
    torch.manual_seed(2)
    got = grad(lambda p: _loss(model, p, x))(_trainable(model))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-10, msg=k)
    after = _eager_grads(copy.deepcopy(model), x, 2)  # eager calls after the transform: still right
    for k in want:
        torch.testing.assert_close(after[k], want[k], rtol=1e-10, atol=1e-10, msg=k)


def test_active_only_inside_transforms():
    assert not torch_func.active()
    seen = []
    grad(lambda t: (seen.append(torch_func.active()), t.sum())[1])(torch.ones(2))
    with fwad.dual_level():
        seen.append(torch_func.active())
    assert seen == [True, True] and not torch_func.active()
    # Dynamo reads the transform checks as true in any traced graph: compiled code must never take the
    # plain path by mistake (it keeps the custom ops and the fused conv node).
    x = torch.full((3,), 3.0)
    compiled = torch.compile(lambda t: t * 2 if torch_func.active() else t + 1, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), x + 1)


@pytest.mark.parametrize(
    "name", ["linear_dropout", "dora_dropout", "conv2d_dropout_groups", "mha_dropout", "masked_rows", "loreft_dropout"]
)
def test_plain_ops_gives_double_backward(name):
    """A gradient penalty (create_graph=True, then backward through grad_x): refused by the fused
    nodes, right under plain_ops. Checked against the same penalty through torch.func (whose grads of
    grads are functorch's own) with the same dropout seed."""
    layer, x = _layer(name)
    x = x.requires_grad_(True)
    params = _trainable(layer)

    def penalty(p, xx):
        (gx,) = torch.autograd.grad(_loss(layer, p, xx), xx, create_graph=True)
        return gx.square().sum()

    torch.manual_seed(5)
    with ftk.plain_ops():
        y = _loss(layer, dict(layer.named_parameters()), x)
        assert "LoRALinearNode" not in y.grad_fn.name()
    (gx,) = torch.autograd.grad(y, x, create_graph=True)
    layer.zero_grad()
    gx.square().sum().backward()
    got = {k: v.grad for k, v in layer.named_parameters() if v.requires_grad}

    def penalty_func(p):
        torch.manual_seed(5)
        gxf = grad(lambda xx: _loss(layer, p, xx))(x.detach())
        return gxf.square().sum()

    want = grad(penalty_func)(params)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-10, msg=k)
    assert not torch_func.active()  # the context is left


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("wrt", ["params", "x"])
def test_fused_double_backward_is_right_or_raises(name, wrt, lora_node):
    """Without plain_ops, grads of grads through the fused path, asked of the parameters or of x with
    ``allow_unused=True``: equal to torch.func's, or the "differentiate twice" error; never a missing
    (None) or wrong one. Before, the first-order nodes' error node led nowhere, so these came back None,
    and MaskedLinear's grad_x carried a second-order gradient into its frozen rows."""
    if LAYERS[name][1] is None:
        pytest.skip("token ids: nothing to differentiate twice through x")
    layer, x = _layer(name)
    x = x.requires_grad_(True)
    params = _trainable(layer)
    targets = [p for p in layer.parameters() if p.requires_grad] if wrt == "params" else [x]

    def penalty_func(p, xx):
        torch.manual_seed(5)
        return grad(lambda xi: _loss(layer, p, xi))(xx).square().sum()

    want = grad(penalty_func, argnums=0 if wrt == "params" else 1)(params, x.detach())
    want = list(want.values()) if wrt == "params" else [want]
    torch.manual_seed(5)
    (gx,) = torch.autograd.grad(_loss(layer, dict(layer.named_parameters()), x), x, create_graph=True)
    try:
        got = torch.autograd.grad(gx.square().sum(), targets, allow_unused=True)
    except RuntimeError as e:
        assert re.search(r"differentiate twice.*plain_ops\(\)", str(e)), str(e)
        return
    for g, w in zip(got, want, strict=True):
        assert g is not None
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_plain_ops_is_left_on_error_and_the_fused_node_returns(lora_node):
    layer, x = _layer("linear")
    with pytest.raises(ValueError), ftk.plain_ops():
        raise ValueError
    assert not torch_func.active()
    with ftk.plain_ops():
        plain = layer(x)
    fused = layer(x)
    torch.testing.assert_close(plain, fused, rtol=1e-12, atol=1e-12)
    assert plain.grad_fn.name() != fused.grad_fn.name()


def test_vmap_over_stacked_models_ensembles():
    """torch.func.stack_module_state + vmap over the parameters (ensembles, model soups): batched
    weights go through the plain path."""
    torch.manual_seed(0)
    models = []
    for _ in range(3):
        m = ftk.apply_lora(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).to(F64), ["0", "2"], r=2)
        for layer in ftk.peft_compat.lora_modules(m).values():
            nn.init.normal_(layer.lora_B)
        models.append(m.eval())
    params, buffers = torch.func.stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(4, 6, dtype=F64)
    got = vmap(lambda p, b: functional_call(skeleton, (p, b), (x,)))(params, buffers)
    torch.testing.assert_close(got, torch.stack([m(x) for m in models]), rtol=1e-12, atol=1e-12)


def test_per_sample_grads_equal_peft():
    """vmap(grad) per-sample gradients of a converted PEFT model (Linear, Conv2d, DoRA) equal PEFT's."""
    from helpers.lora import peft_random, trainable

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc, self.head = nn.Conv2d(2, 4, 3), nn.Linear(36, 10), nn.Linear(10, 3)

        def forward(self, x):
            return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1 if x.dim() == 4 else 0))))

    torch.manual_seed(0)
    peft = peft_random(Net().to(F64), ["conv", "fc", "head"], use_dora=True).eval()
    ours = ftk.from_peft(copy.deepcopy(peft)).eval()
    xs, ys = torch.randn(5, 2, 5, 5, dtype=F64), torch.randint(0, 3, (5,))

    def per_sample(model):
        names = {id(q): n for n, q in trainable(model).items()}
        params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

        def loss(p, x, y):
            return nn.functional.cross_entropy(functional_call(model, p, (x[None],)), y[None])

        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
        return {names[id(q)]: g[k] for k, q in model.named_parameters() if q.requires_grad}

    got, want = per_sample(ours), per_sample(peft)
    assert got.keys() == want.keys() and len(got) == 9
    for k in got:
        torch.testing.assert_close(got[k], want[k].reshape(got[k].shape), rtol=1e-10, atol=1e-12, msg=k)


CUDA_CASES = ["linear_dropout", "dora_dropout", "conv2d_dropout_groups", "loreft_dropout", "masked_rows"]


@pytest.mark.cuda
@pytest.mark.parametrize("name", CUDA_CASES)
def test_grad_transform_on_cuda(name):
    """The plain path on CUDA (the dropout mask from the Triton kernel): grads equal the fused path's."""
    layer, x = _layer(name)
    layer, x = layer.float().cuda(), x.float().cuda()
    want = _eager_grads(layer, x, seed=7)
    torch.manual_seed(7)
    got = grad(lambda p: _loss(layer, p, x))(_trainable(layer))
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4, msg=k)


@pytest.mark.parametrize("name", [n for n in LAYERS if n != "embedding"])
def test_backward_under_vmap_batched_grads(name, lora_node):
    """jacobian(vectorize=True) runs each node's backward once under vmap with batched grads (the fused
    kernels cannot take those): equal to one backward per output element, dropout included."""
    layer, x = _layer(name)
    xx = (x[:1] if x.dim() > 2 else x).requires_grad_(True)
    fn = (lambda t: layer(t, t, t)[0]) if name.startswith("mha") else layer

    def jac(vectorize):
        torch.manual_seed(4)  # the same dropout seed for both
        return torch.autograd.functional.jacobian(fn, xx, vectorize=vectorize)

    torch.testing.assert_close(jac(True), jac(False), rtol=1e-10, atol=1e-12)
    # parameters too: autograd.grad with a batch of output grads
    torch.manual_seed(4)
    y = fn(xx)
    params = [p for p in layer.parameters() if p.requires_grad]
    gs = torch.randn(3, *y.shape, dtype=y.dtype)
    batched = torch.autograd.grad(y, [xx, *params], gs, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        one = torch.autograd.grad(y, [xx, *params], gs[i], retain_graph=True)
        for got, want in zip(batched, one, strict=True):
            torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-12)


def test_fused_double_backward_reaches_the_layers_above(lora_node):
    """A gradient penalty on x asked of a plain layer above the LoRA layer (allow_unused=True): its
    second-order path runs through the fused node's backward, so it raises (it was a silent None)."""
    layer, x = _layer("linear_dropout")
    top = nn.Linear(7, 3).to(F64)
    x = x.requires_grad_(True)
    (gx,) = torch.autograd.grad(torch.tanh(top(layer(x))).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"differentiate twice.*plain_ops\(\)"):
        torch.autograd.grad(gx.square().sum(), [top.weight], allow_unused=True)
    with ftk.plain_ops():
        (gx,) = torch.autograd.grad(torch.tanh(top(layer(x))).square().sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.square().sum(), [top.weight])
    assert gw.abs().max() > 0
