"""DoRA on the LoRA Linear layers (``dora=True`` / ``apply_lora(use_dora=True)``) against PEFT's
``use_dora=True``: outputs and grads (x, A, B, magnitude) with and without dropout, Linear and HF
Conv1D, merge/unmerge, PEFT-format files both ways, training, and what is refused."""

import copy
import warnings

import pytest
import torch
from helpers.lora import compare_with_peft, files_both_ways, fix_dropout, peft_random, trainable
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import ftkernels as ftk
from ftkernels.nn.dora import dora_linear, dora_weight_norm
from ftkernels.nn.lora_linear import lora_op


def peft_dora(base, targets, **kw):
    """PEFT DoRA over a copy of ``base`` with random B and magnitudes off the row norms."""
    return peft_random(base, targets, use_dora=True, **kw)


def fixed_seed_forward(layer, x, seed):
    """The layer's DoRA forward with the dropout seed given (the module draws its own)."""

    w = layer.linear_weight()
    return dora_linear(
        lora_op, x, w, layer.base.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling,
        layer.dropout, lambda: torch.tensor(seed),
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_matches_peft_outputs_and_grads(kind, p):
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7)).double()
        targets, extra = ["0", "2"], {}
    else:
        base = nn.Sequential(Conv1D(10, 12), nn.ReLU(), Conv1D(7, 10)).double()
        targets, extra = ["0", "2"], dict(fan_in_fan_out=True)
    peft = peft_dora(base, targets, p=p, **extra).train()
    ours = ftk.from_peft(copy.deepcopy(peft)).train()
    assert ours[0].dropout == p
    if p:
        fix_dropout(peft, 99, p)
    assert all(ours[i].dora for i in (0, 2))
    x = torch.randn(4, 5, 12, dtype=torch.float64)
    if p:  # PEFT's dropout form; ours with the same seed on each layer
        y = fixed_seed_forward(ours[2], torch.relu(fixed_seed_forward(ours[0], x, 99)), 99)
    else:
        y = ours(x)
    yp = peft(x)
    torch.testing.assert_close(y, yp)
    g = torch.randn_like(y)
    y.backward(g)
    yp.backward(g)
    mine, theirs = trainable(ours), trainable(peft)
    assert set(mine) == set(theirs) and {"0.lora_magnitude", "2.lora_magnitude"} <= set(mine)
    for n, q in mine.items():
        torch.testing.assert_close(q.grad, theirs[n].grad, msg=n)


def test_gradcheck_with_dropout_and_bias(monkeypatch):
    """gradcheck through x, A, B, m and the bias with the row norm held constant (DoRA's rule: no
    gradient through ||W + s B A||, so the numerical Jacobian must not see it move either)."""
    from ftkernels.nn import dora as dora_mod

    torch.manual_seed(1)
    layer = ftk.nn.LoRALinear(nn.Linear(9, 6).double(), r=2, alpha=3, dropout=0.25, dora=True)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(1.5)
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    bias = layer.base.bias.detach().clone().requires_grad_(True)

    wn = dora_weight_norm(layer.base.weight, layer.lora_A, layer.lora_B, layer.scaling)
    monkeypatch.setattr(dora_mod, "dora_weight_norm", lambda *args: wn)
    for p in (0.0, 0.25):

        def f(x, a, b, m, bias, p=p):
            return dora_linear(lora_op, x, layer.base.weight, bias, a, b, m, layer.scaling, p, lambda: torch.tensor(7))

        assert torch.autograd.gradcheck(f, (x, layer.lora_A, layer.lora_B, layer.lora_magnitude, bias))


def test_weight_norm_and_reset_parameters():
    torch.manual_seed(2)
    base = nn.Linear(40, 24).double()
    layer = ftk.nn.LoRALinear(base, r=4, alpha=8, dora=True)
    torch.testing.assert_close(layer.lora_magnitude, base.weight.norm(dim=1))  # starts as the base
    with torch.no_grad():
        layer.lora_B.normal_()
    want = (base.weight + layer.scaling * layer.lora_B @ layer.lora_A).norm(dim=1)
    torch.testing.assert_close(dora_weight_norm(base.weight, layer.lora_A, layer.lora_B, layer.scaling), want)
    w16 = base.weight.to(torch.bfloat16)
    a, b = layer.lora_A.float(), layer.lora_B.float()
    got = dora_weight_norm(w16, a, b, layer.scaling)  # bf16 weight: fp32 norms, no fp32 copy of W
    assert got.dtype == torch.float32
    want16 = (w16.double() + layer.scaling * b.double() @ a.double()).norm(dim=1)
    torch.testing.assert_close(got.double(), want16, rtol=1e-3, atol=0)  # W A^T is rounded to bf16 once
    layer.reset_parameters()
    assert torch.count_nonzero(layer.lora_B) == 0
    torch.testing.assert_close(layer.lora_magnitude, base.weight.norm(dim=1))
    x = torch.randn(5, 40, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_base_against_float64(dtype):
    """fp32 adapters and magnitude on an fp32 / bf16 base (the scale applied in fp32, rounded once)."""
    torch.manual_seed(3)
    ref = ftk.nn.LoRALinear(nn.Linear(64, 48).double(), r=8, alpha=16, dora=True)
    with torch.no_grad():
        ref.lora_B.normal_(std=0.2)
        ref.lora_magnitude.mul_(1 + 0.01 * torch.randn(48, dtype=torch.float64))
    low = copy.deepcopy(ref)
    low.base.to(dtype)
    for name in ("lora_A", "lora_B", "lora_magnitude"):
        setattr(low, name, nn.Parameter(getattr(ref, name).detach().float()))
    x = torch.randn(6, 64, dtype=torch.float64)
    y, yl = ref(x), low(x.to(dtype))
    assert yl.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(yl.double(), y, atol=tol * 5, rtol=tol)
    g = torch.randn_like(y)
    y.backward(g)
    yl.backward(g.to(dtype))
    for name in ("lora_A", "lora_B", "lora_magnitude"):
        want, got = getattr(ref, name).grad, getattr(low, name).grad
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max() <= 5 * tol * want.abs().max(), name


def test_merge_unmerge_and_unload_match_peft():
    torch.manual_seed(4)
    base = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7)).double()
    peft = peft_dora(base, ["0", "2"]).eval()
    ours = ftk.from_peft(copy.deepcopy(peft)).eval()
    x = torch.randn(3, 12, dtype=torch.float64)
    y = ours(x)
    w0 = ours[0].base.weight.detach().clone()
    ftk.merge_lora(ours)
    assert ours[0].merged
    torch.testing.assert_close(ours(x), y)
    ftk.unmerge_lora(ours)
    torch.testing.assert_close(ours[0].base.weight, w0)
    torch.testing.assert_close(ours(x), y)
    plain = ftk.unload_lora(copy.deepcopy(ours), merge=True)
    merged_peft = copy.deepcopy(peft).merge_and_unload()
    for i in (0, 2):
        assert type(plain[i]) is nn.Linear
        torch.testing.assert_close(plain[i].weight, merged_peft[i].weight)
    torch.testing.assert_close(plain(x), y)


def test_adapter_files_both_ways(tmp_path):
    torch.manual_seed(5)
    base = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7))
    ours = ftk.apply_lora(copy.deepcopy(base), ["0", "2"], r=4, alpha=8, use_dora=True)
    with torch.no_grad():
        for n, q in ours.named_parameters():
            if q.requires_grad:
                q.mul_(1 + 0.3 * torch.randn_like(q)) if "magnitude" in n else q.normal_(std=0.3)
    ftk.save_adapter(ours, str(tmp_path / "ours"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    ours.eval()
    x = torch.randn(3, 12)
    torch.testing.assert_close(loaded(x), ours(x))
    loaded.save_pretrained(str(tmp_path / "peft"))
    mine = ftk.load_adapter(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert mine[0].dora and mine[2].lora_magnitude.requires_grad
    torch.testing.assert_close(mine(x), ours(x))
    # a DoRA file into plain LoRA layers (and back) is refused, nothing written
    plain = ftk.apply_lora(copy.deepcopy(base), ["0", "2"], r=4, alpha=8)
    with pytest.raises(ValueError, match="use_dora=True"):
        ftk.load_adapter(plain, str(tmp_path / "ours"))
    mixed = ftk.apply_lora(copy.deepcopy(base), ["0"], r=4, use_dora=True)
    ftk.apply_lora(mixed, ["2"], r=4)
    with pytest.raises(ValueError, match="one kind"):
        ftk.save_adapter(mixed, str(tmp_path / "mixed"))


def test_trains_like_peft_and_runs_alone():
    """A q/k/v-like block with DoRA on three sibling Linear layers reading the same x: 5 AdamW steps
    (ours: FusedAdamW) give PEFT's weights; DoRA layers are never put in a shared-input group."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 4, -1)
            return self.head((a @ self.v(x)).mean(1))

    torch.manual_seed(6)
    base = Block()
    targets = ["q", "k", "v"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    ours = ftk.apply_lora(copy.deepcopy(base), targets, r=4, alpha=8, use_dora=True)
    with torch.no_grad():
        for name in targets:
            getattr(ours, name).lora_A.copy_(peft.base_model.model.get_submodule(name).lora_A["default"].weight)
    assert all(getattr(ours, n)._lora_group is None for n in targets)
    opt_p = torch.optim.AdamW([q for q in peft.parameters() if q.requires_grad], lr=1e-2)
    opt_o = ftk.optim.FusedAdamW([q for q in ours.parameters() if q.requires_grad], lr=1e-2)
    for _ in range(5):
        x, t = torch.randn(4, 6, 16), torch.randint(0, 3, (4,))
        for model, opt in ((peft, opt_p), (ours, opt_o)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), t).backward()
            opt.step()
    mine, theirs = trainable(ours), trainable(peft)
    assert set(mine) == set(theirs)
    for n, q in mine.items():
        torch.testing.assert_close(q, theirs[n], atol=1e-5, rtol=1e-4, msg=n)
    assert (ours.q.lora_magnitude - base.q.weight.norm(dim=1)).abs().max() > 1e-3  # the magnitude trained


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_compiles_without_graph_breaks(p):
    torch.manual_seed(7)
    m = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    ftk.apply_lora(m, ["0", "2"], r=2, dropout=p, use_dora=True)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 8)
    out = []
    for f in (compiled, m):
        m.zero_grad()
        torch.manual_seed(0)
        y = f(x)
        y.sum().backward()
        out.append((y.detach(), m[0].lora_magnitude.grad.clone()))
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])


@pytest.mark.parametrize("strategy", ["unmerged", "merged"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_conv2d_matches_peft(strategy, p, monkeypatch):
    """DoRA on Conv2d (PEFT's per-channel magnitude [1, out, 1, 1]): both strategies, dropout with the
    same mask, grads of x, A, B and m; merge gives PEFT's merged weight."""
    torch.manual_seed(11)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 1)).double()
    peft = peft_dora(base, ["0", "2"], r=2, alpha=4, p=p).train()
    ours = ftk.from_peft(copy.deepcopy(peft)).train()
    assert ours[0].dora and ours[0].lora_magnitude.shape == (1, 6, 1, 1)
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    if p:  # both layers draw seed 5, PEFT's dropout slots hold that seed's mask
        fix_dropout(peft, 5, p)
        orig = ftk.nn.lora_conv2d.call_seed
        monkeypatch.setattr(ftk.nn.lora_conv2d, "call_seed", lambda q, dev: torch.tensor(5) if q > 0 else orig(q, dev))
    for layer in (ours[0], ours[2]):
        layer.strategy = strategy if p == 0 else "auto"
    compare_with_peft(ours, peft, x)
    ours.eval(), peft.eval()
    want = ours(x)
    plain = ftk.unload_lora(copy.deepcopy(ours), merge=True)
    torch.testing.assert_close(plain[0].weight, copy.deepcopy(peft).merge_and_unload()[0].weight)
    torch.testing.assert_close(plain(x), want)


def test_conv2d_adapter_files_both_ways(tmp_path):
    torch.manual_seed(12)
    base = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1))
    peft = peft_dora(base, ["0", "2"], r=2, alpha=4).eval()
    mine = files_both_ways(base, peft, torch.randn(2, 3, 8, 8), tmp_path)
    assert mine[0].dora and mine[2].dora


def test_grouped_conv_dora_is_refused():
    with pytest.raises(ValueError, match="DoRA on a grouped conv"):
        ftk.nn.LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), r=2, dora=True)
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1, groups=2))
    with pytest.raises(ValueError, match="DoRA on a grouped conv"):
        ftk.apply_lora(model, ["0", "1"], r=2, use_dora=True)
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_peft(dtype):
    torch.manual_seed(8)
    base = nn.Sequential(nn.Linear(256, 192), nn.GELU(), nn.Linear(192, 64)).to("cuda", dtype)
    peft = peft_dora(base, ["0", "2"], r=16, alpha=32).eval()
    ours = ftk.from_peft(copy.deepcopy(peft)).eval()
    x = torch.randn(4, 33, 256, device="cuda", dtype=dtype)
    y, yp = ours(x), peft(x)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(y.float(), yp.float(), atol=tol * 4, rtol=tol)
    g = torch.randn_like(y)
    y.backward(g)
    yp.backward(g)
    mine, theirs = trainable(ours), trainable(peft)
    for n, q in mine.items():
        scale = max(1.0, theirs[n].grad.abs().max().item())
        torch.testing.assert_close(q.grad.float(), theirs[n].grad.float(), atol=tol * 4 * scale, rtol=tol, msg=n)


def test_output_takes_in_place_ops():
    """Residual adds in place on the layer's output (Falcon's ``mlp_output += attention_output``)."""
    torch.manual_seed(9)
    layer = ftk.nn.LoRALinear(nn.Linear(6, 6).double(), r=2, dora=True)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y += x
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    mns = layer.lora_magnitude / dora_weight_norm(layer.base.weight, layer.lora_A, layer.lora_B, layer.scaling)
    w = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A
    want = (x2 @ w.t()) * mns + layer.base.bias + x2
    want.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_cpu_autocast_bf16(p):
    """An fp32 layer under CPU autocast to bf16: bf16 output, fp32 grads for A, B and m, close to the
    fp32 result (with the same dropout seed)."""
    torch.manual_seed(10)
    layer = ftk.nn.LoRALinear(nn.Linear(32, 24), r=4, alpha=8, dropout=p, dora=True)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.lora_magnitude.mul_(1.1)
    x = torch.randn(5, 32)
    want = fixed_seed_forward(layer, x, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fixed_seed_forward(layer, x, 3)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, atol=5e-2, rtol=2e-2)
    y.float().sum().backward()
    assert all(q.grad.dtype == torch.float32 for q in (layer.lora_A, layer.lora_B, layer.lora_magnitude))


def test_from_a_merged_peft_model_unmerges():
    """A PEFT DoRA model merged in place (its cached row norms kept) converts merged; unmerging then
    restores the base weight and the adapter's outputs, as PEFT's own unmerge does."""
    torch.manual_seed(13)
    base = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    peft = peft_dora(base, ["0", "2"]).eval()
    x = torch.randn(4, 8, dtype=torch.float64)
    want = peft(x)
    peft.merge_adapter()
    ours = ftk.from_peft(copy.deepcopy(peft)).eval()
    assert ours[0].merged
    torch.testing.assert_close(ours(x), want)
    ftk.unmerge_lora(ours)
    torch.testing.assert_close(ours[0].base.weight, base[0].weight)
    torch.testing.assert_close(ours(x), want)
