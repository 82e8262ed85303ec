"""Opacus (DP-SGD) on the fused LoRA layers: per-sample gradients against per-example autograd on the
same forward (same dropout masks), repeated layers, HF Conv1D, the refusals, and a private step with
FusedAdamW."""

import copy

import pytest
import torch
from torch import nn

import ftkernels as ftk

opacus = pytest.importorskip("opacus")
from opacus import GradSampleModule  # noqa: E402


class Net(nn.Module):
    """Two LoRA Linears (one called twice: Opacus sums its per-call rules) and an HF Conv1D."""

    def __init__(self, p: float):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.a = ftk.nn.LoRALinear(nn.Linear(7, 9), r=3, alpha=5, dropout=p)
        self.b = ftk.nn.LoRALinear(nn.Linear(9, 9), r=2, alpha=3, dropout=p)
        self.c = ftk.nn.LoRAConv1D(Conv1D(4, 9), r=2, alpha=4, dropout=p)
        for m in (self.a, self.b, self.c):
            nn.init.normal_(m.lora_B)  # PEFT's zero B would make A's gradients zero

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h))
        h = self.c(self.b(h))
        return self.sq(h) if hasattr(self, "sq") else h


def _per_example(model, x, seed):
    """Per-example gradients by autograd on one forward (drawn after ``seed``, as the Opacus run)."""
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    out = model(x)
    rows = [torch.autograd.grad(out[n].square().sum(), params, retain_graph=True) for n in range(x.shape[0])]
    return {p: torch.stack([r[i] for r in rows]) for i, p in enumerate(params)}, out


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_per_sample_gradients_equal_per_example_autograd(p):
    torch.manual_seed(0)
    model = Net(p).double().train()
    model.b.base.bias.requires_grad_(True)  # a base bias left trainable takes the plain rule
    from transformers.pytorch_utils import Conv1D

    model.sq = ftk.nn.LoRAConv1D(Conv1D(4, 4), r=2, dropout=p).double()
    model.sq.base.weight.requires_grad_(True)  # square HF Conv1D ([in, out] = [out, in] in shape)
    x = torch.randn(5, 6, 7, dtype=torch.float64)
    twin = copy.deepcopy(model)
    want, ref = _per_example(twin, x, seed=11)
    gsm = GradSampleModule(model, loss_reduction="sum")
    torch.manual_seed(11)
    out = gsm(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the same masks
    out.square().sum().backward()
    for (name, q), tq in zip(model.named_parameters(), twin.parameters(), strict=True):
        if not q.requires_grad:
            continue
        torch.testing.assert_close(q.grad_sample, want[tq], rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(q.grad, want[tq].sum(0), rtol=1e-10, atol=1e-12, msg=name)
    if p:
        assert all(not m.__dict__.get("_ftk_dp_seeds") for m in (model.a, model.b, model.c))  # all popped


def test_bf16_base_fp32_adapters_under_autocast():
    """A bf16 base with fp32 adapters, as apply_lora makes them, under autocast: per-sample rules in
    the adapters' fp32, within bf16's error of the float64 ones on the same masks."""
    torch.manual_seed(0)
    model = Net(0.2).train()
    twin = copy.deepcopy(model).double()
    for m in (model.a, model.b, model.c):
        m.base.to(torch.bfloat16)
    x = torch.randn(4, 3, 7)
    want, _ = _per_example(twin, x.double(), seed=5)
    gsm = GradSampleModule(model, loss_reduction="sum")
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gsm(x)
    out.float().square().sum().backward()
    for (name, q), tq in zip(model.named_parameters(), twin.parameters(), strict=True):
        if q.requires_grad:
            assert q.grad_sample.dtype == torch.float32, name
            err = (q.grad_sample.double() - want[tq]).abs().max() / want[tq].abs().max()
            assert err < 0.05, (name, err.item())


def test_convs_and_dora_without_dropout_and_refused_with_it():
    """LoRA convs and DoRA take Opacus's vmap rule without dropout (equal to per-example autograd)
    and raise a clear error with it (vmap cannot redraw the mask)."""
    torch.manual_seed(0)
    conv = ftk.nn.LoRAConv2d(nn.Conv2d(3, 4, 3, padding=1), r=2, alpha=2)
    nn.init.normal_(conv.lora_B)
    model = nn.Sequential(conv, nn.Flatten(), ftk.nn.LoRALinear(nn.Linear(4 * 25, 3), r=2, dora=True)).double()
    nn.init.normal_(model[2].lora_B)
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    pristine, twin = copy.deepcopy(model), copy.deepcopy(model)
    want, _ = _per_example(twin, x, seed=0)
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm(x).square().sum().backward()
    for q, tq in zip(model.parameters(), twin.parameters(), strict=True):
        if q.requires_grad:
            torch.testing.assert_close(q.grad_sample, want[tq], rtol=1e-9, atol=1e-11)
    for i, match in ((0, "LoRAConv2d with LoRA dropout"), (2, "DoRA LoRALinear with dropout")):
        drop = copy.deepcopy(pristine)  # (a hooked model's copy would carry the first wrapper's hooks)
        target = drop[i]
        target.dropout = 0.25
        gsm = GradSampleModule(drop, loss_reduction="sum")
        with pytest.raises(NotImplementedError, match=match):
            gsm(x).square().sum().backward()


def test_private_step_with_fused_adamw_equals_a_plain_step():
    """PrivacyEngine.make_private with FusedAdamW on a LoRA model: with no noise and a clipping bound
    no example reaches, the private step is the plain step on the mean loss."""
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = Net(0.0).double().train()
    plain = copy.deepcopy(model)
    x, y = torch.randn(8, 6, 7, dtype=torch.float64), torch.randn(8, 6, 4, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    opt = ftk.optim.FusedAdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    engine = PrivacyEngine(accountant="rdp")
    priv, popt, ploader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1e6, poisson_sampling=False
    )
    for xb, yb in ploader:
        popt.zero_grad()
        nn.functional.mse_loss(priv(xb), yb).backward()
        popt.step()
    ref = ftk.optim.FusedAdamW([q for q in plain.parameters() if q.requires_grad], lr=1e-2)
    nn.functional.mse_loss(plain(x), y).backward()
    ref.step()
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), Net(0.0).double().parameters()))


def test_seeds_are_kept_only_for_calls_opacus_captures():
    """No seed piles up for calls Opacus does not capture: no_grad, eval, hooks disabled."""
    torch.manual_seed(0)
    model = Net(0.3).double().train()
    gsm = GradSampleModule(model, loss_reduction="sum")
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    with torch.no_grad():
        gsm(x)
    gsm.eval()
    gsm(x)
    gsm.train()
    gsm.disable_hooks()
    gsm(x)
    assert all(not m.__dict__.get("_ftk_dp_seeds") for m in (model.a, model.b, model.c))
    gsm.enable_hooks()
    gsm(x).square().sum().backward()
    assert model.a.lora_A.grad_sample.shape == (2, 3, 7)


def test_attention_is_refused_with_the_way_out():
    """LoRAMultiheadAttention under Opacus: a clear error (Opacus would rerun it without its keyword
    masks), naming Opacus's DPMultiheadAttention, whose Linear projections take LoRA."""
    mha = ftk.nn.LoRAMultiheadAttention(nn.MultiheadAttention(8, 2, batch_first=True), r=2)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    gsm = GradSampleModule(Block(), loss_reduction="sum")
    with pytest.raises(NotImplementedError, match="DPMultiheadAttention"):
        gsm(torch.randn(2, 3, 8)).square().sum().backward()


def test_parameter_adapters_are_refused_with_the_way_out():
    """LoRAParams (target_parameters): Opacus hooks its adapter modules, which are never called, so it
    found no per-sample gradient for them (grad_sample stayed None; a private step then failed far
    from the cause): now the forward raises, naming the way out."""

    class Scorer(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 7))

        def forward(self, x):
            return torch.softmax(x @ self.weight.t(), -1)

    model = ftk.apply_lora(nn.Sequential(Scorer()), [], target_parameters=["0.weight"], r=3)
    x = torch.randn(4, 7)
    model(x)  # (without Opacus it runs)
    gsm = GradSampleModule(model, loss_reduction="sum")
    with pytest.raises(NotImplementedError, match=r"LoRAParams: per-sample gradients \(Opacus\).*=\[\]"):
        gsm(x)
