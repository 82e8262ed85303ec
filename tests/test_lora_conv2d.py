"""LoRAConv2d against PEFT's lora.Conv2d and a plain-PyTorch reference: both strategies, strides,
padding, dilation, kernel sizes, memory formats, dropout (the fused stream), gradcheck, and a
ResNet-18 that trains like PEFT's."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.lora import FixedMaskDropout, compare_with_peft, paired_conv_inputs
from helpers.models import resnet18
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Conv2d as PeftConv2d
from torch import nn

import ftkernels as ftk
from ftkernels.nn.lora_conv2d import choose_strategy
from ftkernels.nn.lora_linear import draw_seed
from ftkernels.nn.reference import lora_conv2d_reference, lora_keep_mask
from ftkernels.ops import lora_dropout as dropout_op


def keep4d(seed, shape, p):
    """The stream's keep mask for a tensor of ``shape``: logical [numel / W, W] rows."""
    n = 1
    for s in shape[:-1]:
        n *= s
    return lora_keep_mask(seed, n, shape[-1], p).view(shape)


def make_pair(cin, cout, k, stride=1, padding=0, r=3, p=0.0, dtype=torch.float64, bias=True):
    base = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias).to(dtype)
    pb = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias).to(dtype)
    pb.load_state_dict(base.state_dict())
    ours = ftk.nn.LoRAConv2d(base, r=r, alpha=2 * r, dropout=p).to(dtype)
    with torch.no_grad():
        ours.lora_B.normal_()
    peft = PeftConv2d(pb, "default", config=LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p), r=r, lora_alpha=2 * r)
    with torch.no_grad():
        peft.lora_A["default"].weight.copy_(ours.lora_A)
        peft.lora_B["default"].weight.copy_(ours.lora_B)
    peft.to(dtype)
    return ours, peft


def reference(x, ours, p=0.0, seed=0):
    """Plain torch: base conv + s * B(A(D(x))) with the base's stride, padding, dilation and groups."""
    return lora_conv2d_reference(x, ours.weight, ours.bias, ours.lora_A, ours.lora_B, ours.scaling, ours.geom, p, seed)


CASES = [  # cin, cout, k, stride, padding, N, H, W
    (3, 5, 1, 1, 0, 2, 7, 6),
    (5, 7, 3, 1, 1, 1, 9, 8),
    (6, 4, 3, 2, 1, 2, 11, 9),
    (3, 6, 7, 2, 3, 1, 15, 13),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("strategy", ["unmerged", "merged"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_peft_no_dropout(case, strategy, channels_last):
    cin, cout, k, stride, padding, n, h, w = case
    ours, peft = make_pair(cin, cout, k, stride, padding)
    ours.strategy = strategy
    x1, x2 = paired_conv_inputs(ours, peft, (n, cin, h, w), channels_last)
    y, yp = ours(x1), peft(x2)
    assert ours.last_strategy == strategy
    torch.testing.assert_close(y, yp)
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, (x1, ours.lora_A, ours.lora_B, ours.base.bias), g)
    gp = torch.autograd.grad(
        yp, (x2, peft.lora_A["default"].weight, peft.lora_B["default"].weight, peft.base_layer.bias), g
    )
    for a, b in zip(ga, gp, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("strategy", ["unmerged", "merged"])
def test_rank_above_the_smaller_dimension_matches_peft(strategy):
    """r > min(out, in*kh*kw) is legal in PEFT (not low rank, still LoRA's math): same outputs and grads."""
    ours, peft = make_pair(3, 2, 1, r=5)
    ours.strategy = strategy
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    y, yp = ours(x), peft(x)
    torch.testing.assert_close(y, yp)
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, (ours.lora_A, ours.lora_B), g)
    gp = torch.autograd.grad(yp, (peft.lora_A["default"].weight, peft.lora_B["default"].weight), g)
    for a, b in zip(ga, gp, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", CASES[1:])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dropout_matches_peft_with_the_same_mask(case, dtype):
    cin, cout, k, stride, padding, n, h, w = case
    ours, peft = make_pair(cin, cout, k, stride, padding, p=0.3, dtype=dtype)
    seed = 4321
    peft.lora_dropout["default"] = FixedMaskDropout(seed, 0.3)
    x = torch.randn(n, cin, h, w, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    geom = ours.geom
    y = ftk.nn.lora_conv2d._UnmergedConv.apply(
        x1, ours.weight, ours.bias, ours.lora_A, ours.lora_B, ours.scaling, 0.3, torch.tensor(seed), geom
    )
    yp = peft(x2)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y, yp, **tol)
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, (x1, ours.lora_A, ours.lora_B), g)
    gp = torch.autograd.grad(yp, (x2, peft.lora_A["default"].weight, peft.lora_B["default"].weight), g)
    for a, b in zip(ga, gp, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_dilation_against_reference_and_gradcheck():
    """PEFT 0.21 builds lora_A without the base's dilation (its layer fails on dilated convs); the
    issue's math gives A the base's dilation: checked against the plain-torch reference."""
    base = nn.Conv2d(4, 5, 3, stride=1, padding=2, dilation=2).double()
    ours = ftk.nn.LoRAConv2d(base, r=2, alpha=4, dropout=0.25).double()
    with torch.no_grad():
        ours.lora_B.normal_()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(17)

    def f(x, a, b):
        fn = ftk.nn.lora_conv2d._UnmergedConv
        return fn.apply(x, ours.weight, ours.bias, a, b, ours.scaling, 0.25, seed, ours.geom)

    torch.testing.assert_close(f(x, ours.lora_A, ours.lora_B), reference(x, ours, 0.25, 17))
    assert torch.autograd.gradcheck(f, (x, ours.lora_A, ours.lora_B))
    ours.strategy = "merged"
    ours.eval()
    assert torch.autograd.gradcheck(lambda x, a, b: ours(x), (x, ours.lora_A, ours.lora_B))


def test_strategies_agree_and_merge():
    ours, _ = make_pair(6, 8, 3, 1, 1)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    outs = {}
    for s in ("unmerged", "merged"):
        ours.strategy = s
        outs[s] = ours(x)
    torch.testing.assert_close(outs["unmerged"], outs["merged"])
    ours.merge()
    torch.testing.assert_close(ours(x), outs["merged"])
    ours.unmerge()
    torch.testing.assert_close(ours(x), outs["merged"])


def test_auto_strategy_rules():
    w3, w1 = torch.empty(64, 64, 3, 3), torch.empty(64, 64, 1, 1)
    big, small = torch.empty(1, 64, 28, 28), torch.empty(1, 64, 7, 7)
    assert choose_strategy(big, w1, 8, None, 0.1, True) == "unmerged"  # dropout: only unmerged fuses it
    assert choose_strategy(big, w3, 8, None, 0.0, False) == "merged"  # no autograd: one conv
    assert choose_strategy(big, w1, 8, None, 0.0, True) == "merged"
    assert choose_strategy(small, w1, 8, None, 0.0, True) == "unmerged"
    assert choose_strategy(big, w3, 8, None, 0.0, True) == "unmerged"
    # GPUs (any non-CPU device; meta stands in here): merged for every shape when training
    # without dropout (the H100 per-layer measurements), unmerged with dropout
    for x in (big, small):
        for w in (w1, w3):
            assert choose_strategy(x.to("meta"), w.to("meta"), 8, None, 0.0, True) == "merged"
    assert choose_strategy(big.to("meta"), w1.to("meta"), 8, None, 0.1, True) == "unmerged"
    ours, _ = make_pair(4, 4, 3, 1, 1, p=0.2)
    with pytest.raises(ValueError, match="merged"):
        ours.strategy = "merged"
        ours(torch.randn(1, 4, 5, 5, dtype=torch.float64))


def test_dropout_op_stream_and_memory_formats():
    x = torch.randn(2, 3, 5, 7)
    seed = torch.tensor(99)
    d = dropout_op.lora_dropout(x, 0.4, seed)
    torch.testing.assert_close(d, x * keep4d(99, x.shape, 0.4) / 0.6)
    dcl = dropout_op.lora_dropout(x.to(memory_format=torch.channels_last), 0.4, seed)
    assert dcl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(dcl, d)  # the mask follows logical indices
    torch.library.opcheck(dropout_op.lora_dropout, (x.requires_grad_(True), 0.4, seed))


def test_dropout_op_triton_equals_cpu():
    from ftkernels.triton import lora_dropout as tk

    x = torch.randn(2, 3, 5, 37)
    seed = torch.tensor(2024)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # else through Triton's interpreter
    x5 = torch.randn(2, 3, 4, 5, 37)  # Conv3d inputs: dense, channels-last-3d (folds D and H), a slice
    cases = (x, x.to(memory_format=torch.channels_last), x[:, :, 1:4], x[0], x5)
    for t in (*cases, x5.to(memory_format=torch.channels_last_3d), x5[:, ::2, :, 1:4]):
        got = tk.lora_dropout(t.to(dev), 0.3, seed.to(dev))
        assert got.stride() == torch.empty_like(t).stride()
        torch.testing.assert_close(got.cpu(), dropout_op.lora_dropout(t, 0.3, seed))


def test_saved_tensors_hold_no_dropped_copy():
    ours, _ = make_pair(8, 16, 3, 1, 1, p=0.3, dtype=torch.float32)
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ours(x)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    y.sum().backward()
    assert ours.lora_A.grad is not None and ours.base.weight.grad is None


def test_conv_subclasses_with_their_own_forward_are_refused():
    """timm's StdConv2d (weight standardization in forward) and a conv padding its input its own way
    in _conv_forward (top-left only: neither static nor TensorFlow's "SAME") compute something the
    fused layer would not: refused, by from_peft too, before it changes the PEFT model."""

    class StdConv2d(nn.Conv2d):
        def forward(self, x):
            w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    class TopLeftPadConv2d(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return F.conv2d(F.pad(x, (2, 0, 2, 0)), weight, bias, self.stride)

    for cls, method in ((StdConv2d, "forward"), (TopLeftPadConv2d, "_conv_forward")):
        with pytest.raises(TypeError, match=f"{cls.__name__} overrides Conv2d.{method}"):
            ftk.nn.LoRAConv2d(cls(3, 4, 3), r=2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), StdConv2d(4, 4, 3))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["0", "1"]))
    before = [type(m) for m in peft.modules()]
    with pytest.raises(TypeError, match="StdConv2d overrides"):
        ftk.from_peft(peft)
    assert [type(m) for m in peft.modules()] == before


class TFSameConv2d(nn.Conv2d):
    """TensorFlow's dynamic "SAME" conv as timm's ``Conv2dSame`` computes it (written here from the
    rule: per dim, ``pad = max((ceil(i / s) - 1) s + (k - 1) d + 1 - i, 0)``, the odd unit after),
    with timm's constructor (padding argument ignored: the conv itself is unpadded)."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True):
        super().__init__(cin, cout, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x):
        pads = []
        for i, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
            pads = [total // 2, total - total // 2] + pads
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class PaddedMaskDropout(nn.Module):
    """The LoRA stream's mask for x padded as the TF-same ``conv`` pads it, applied to x (padding,
    masking, cropping back): the dropout a TF-same LoRA layer applies to the padded input."""

    def __init__(self, seed, p, conv):
        super().__init__()
        self.drop, self.geom = FixedMaskDropout(seed, p), (conv.kernel_size, conv.stride, conv.dilation)

    def forward(self, x):
        xp = ftk.nn._lora_common.tf_same_pad(x, *self.geom)
        top, left = (xp.shape[-2] - x.shape[-2]) // 2, (xp.shape[-1] - x.shape[-1]) // 2
        return self.drop(xp)[..., top : top + x.shape[-2], left : left + x.shape[-1]]


@pytest.mark.parametrize("strategy", ["unmerged", "merged"])
def test_tf_same_padding_base_matches_peft(strategy, monkeypatch):
    """A conv padding TensorFlow's way per input (timm's Conv2dSame: TF-ported EfficientNet, MixNet,
    MobileNetV3) is recognised (``tf_same``) and x padded so before both convs; PEFT builds its A as
    the base's class, so it pads the same way. Float64 against PEFT on inputs of both parities,
    strides 1 and 2, even and odd kernels, dropout with the same mask; merge and unload keep the
    outputs (the merged weight goes back into the TF-same conv)."""
    torch.manual_seed(17)
    model = nn.Sequential(
        TFSameConv2d(3, 8, 3, stride=2), nn.Tanh(), TFSameConv2d(8, 8, 4, stride=1), nn.Tanh(),
        TFSameConv2d(8, 6, 5, stride=2), nn.Tanh(), TFSameConv2d(6, 6, 3, stride=2, groups=2),
    ).double()  # fmt: skip
    for p in (0.0, 0.3):
        peft = get_peft_model(
            copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, lora_dropout=p, target_modules=["0", "2", "4", "6"])
        )
        with torch.no_grad():
            for n, q in peft.named_parameters():
                if "lora_B" in n:
                    q.normal_(std=0.5)
        ours = ftk.from_peft(copy.deepcopy(peft)).train()
        peft.train()
        layers = [ours[i] for i in (0, 2, 4, 6)]
        assert all(layer.tf_same for layer in layers)
        if p:  # our stream keys the mask on the padded x's indices: PEFT's slot masks x so too
            for i in (0, 2, 4, 6):
                peft.base_model.model[i].lora_dropout["default"] = PaddedMaskDropout(5, p, model[i])
            monkeypatch.setattr(ftk.nn.lora_conv2d, "call_seed", lambda q, dev: torch.tensor(5))
        else:
            for layer in layers[:3]:
                layer.strategy = strategy
        for size in ((11, 12), (16, 9)):
            compare_with_peft(ours, peft, torch.randn(2, 3, *size, dtype=torch.float64))
            ours.zero_grad(), peft.zero_grad()
    ours.eval()
    x = torch.randn(2, 3, 13, 10, dtype=torch.float64)
    want = ours(x)
    for layer in layers[:3]:  # (layer 6 is grouped: not mergeable)
        layer.merge()  # the base (the TF-same conv's own forward) then runs with W + s B A
    torch.testing.assert_close(ours(x), want)
    # dilated: PEFT's A (built without the dilation) pads and convolves otherwise; not converted
    dilated = nn.Sequential(TFSameConv2d(3, 4, 3, stride=2, dilation=2)).double()
    with pytest.raises(NotImplementedError, match="dilation"):
        ftk.from_peft(get_peft_model(copy.deepcopy(dilated), LoraConfig(r=2, target_modules=["0"])))
    mine = ftk.apply_lora(copy.deepcopy(dilated), ["0"], r=2)  # our own: A dilated, TF-padded as the base
    assert mine[0].tf_same
    x = torch.randn(1, 3, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        mine[0].lora_B.normal_()
    a, b = mine[0].lora_A, mine[0].lora_B
    # effective kernel 5 at stride 2: H = 9 pads 4 (2, 2), W = 10 pads 3 (1 before, 2 after)
    u = F.conv2d(F.pad(x, (1, 2, 2, 2)), a, None, 2, 0, 2)
    ref = dilated(x) + mine[0].scaling * F.conv2d(u, b)
    torch.testing.assert_close(mine(x), ref)


def test_conv_attributes_read_by_models_around_the_layer():
    """Models read the conv's geometry: HF MobileNet's TF "same" padding pads by ``stride`` and
    ``kernel_size`` before every conv. The layer exposes the base conv's attributes; MobileNetV1 with
    LoRA on every ungrouped conv equals the model with plain-PyTorch LoRA convs (float64, both
    strategies). PEFT's layer lacks these attributes, so its LoRA cannot run this model."""
    from transformers import MobileNetV1Config, MobileNetV1Model

    base = nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    layer = ftk.nn.LoRAConv2d(base, r=4)
    for name in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode", "in_channels"):
        assert getattr(layer, name) == getattr(base, name), name

    class RefLoRAConv(nn.Conv2d):  # the plain math, on a subclass so that the model's reads work
        def forward(self, x):
            geom = (self.stride, self.padding, self.dilation, self.groups)
            return lora_conv2d_reference(x, self.weight, self.bias, self.a, self.b, self.s, geom)

    torch.manual_seed(0)
    model = MobileNetV1Model(MobileNetV1Config(depth_multiplier=0.25, image_size=32)).double().eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    assert len(names) > 5 and model.config.tf_padding
    x = torch.randn(2, 3, 33, 31, dtype=torch.float64)  # odd sizes: uneven TF padding
    for strategy in ("merged", "unmerged"):
        ours = ftk.apply_lora(copy.deepcopy(model), names, r=4, alpha=8)
        ref = copy.deepcopy(model)
        for n in names:
            layer, conv = ours.get_submodule(n), ref.get_submodule(n)
            layer.strategy = strategy
            nn.init.normal_(layer.lora_B, std=0.5)
            conv.__class__ = RefLoRAConv
            conv.a, conv.b, conv.s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
        y, y_ref = ours(x).last_hidden_state, ref(x).last_hidden_state
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9 * y_ref.abs().max().item())
        assert (y_ref - model(x).last_hidden_state).abs().max() > 1e-3 * y_ref.abs().max()  # LoRA counts


def test_bad_input_errors():
    with pytest.raises(ValueError, match="r must be a multiple of it"):
        ftk.nn.LoRAConv2d(nn.Conv2d(6, 6, 3, groups=3), r=4)
    with pytest.raises(ValueError, match="padding_mode"):
        ftk.nn.LoRAConv2d(nn.Conv2d(4, 4, 3, padding_mode="reflect"))
    with pytest.raises(TypeError, match="Conv2d"):
        ftk.nn.LoRAConv2d(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        ftk.nn.LoRAConv2d(nn.Conv2d(3, 4, 3), r=2, alpha=float("nan"))
    with pytest.raises(ValueError, match="r must be a positive int"):
        ftk.nn.LoRAConv2d(nn.Conv2d(3, 4, 3), r=True)
    m = ftk.nn.LoRAConv2d(nn.Conv2d(3, 4, 3), r=2)
    with pytest.raises(ValueError, match="expected"):
        m(torch.randn(1, 5, 8, 8))
    with pytest.raises(TypeError, match="must match"):
        m(torch.randn(1, 3, 8, 8, dtype=torch.float64))


def test_from_peft_layer_and_unbatched_and_autocast():
    _, peft = make_pair(5, 7, 3, 2, 1, p=0.1, dtype=torch.float32)
    ours = ftk.nn.LoRAConv2d.from_peft_layer(peft)
    assert (ours.r, ours.dropout, ours.scaling) == (3, 0.1, peft.scaling["default"])
    ours.eval(), peft.eval()
    x = torch.randn(5, 10, 10)
    torch.testing.assert_close(ours(x), peft(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x[None]).dtype == torch.bfloat16


def test_autocast_takes_low_precision_activations_on_an_fp32_base():
    # Inside autocast the activations a conv sees are already bf16 (the previous conv's output)
    # while the base stays fp32: nn.Conv2d accepts that, so must we, with its numbers.
    ours, _ = make_pair(6, 5, 3, 3, 1, p=0.0, dtype=torch.float32)
    with torch.no_grad():
        ours.lora_B.normal_()
    x = torch.randn(2, 6, 9, 9).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
        ref = ours.base(x) + ours.scaling * F.conv2d(
            F.conv2d(x, ours.lora_A, None, ours.base.stride, ours.base.padding, ours.base.dilation), ours.lora_B
        )
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), atol=0.05, rtol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and ours.lora_A.grad.dtype == torch.float32


def test_fp32_adapters_on_a_bf16_base_one_autograd_node():
    """PEFT's layout for a bf16 model (fp32 adapters): the unmerged node casts them inside (no cast
    nodes; host time grows with nodes) and returns fp32 grads equal to the fp64 reference's."""
    torch.manual_seed(2)
    base = nn.Conv2d(6, 5, 3, padding=1).to(torch.bfloat16)
    ours = ftk.nn.LoRAConv2d(base, r=2, alpha=4, dropout=0.25, strategy="unmerged")
    assert ours.lora_A.dtype == torch.float32
    with torch.no_grad():
        ours.lora_B.normal_()
    x = torch.randn(2, 6, 7, 7, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(5)
    y = ours(x)
    assert type(y.grad_fn).__name__ == "_UnmergedConvBackward"
    assert [type(f).__name__ for f, _ in y.grad_fn.next_functions if f is not None] == ["AccumulateGrad"] * 3
    g = torch.randn_like(y)
    y.backward(g)
    assert ours.lora_A.grad.dtype == ours.lora_B.grad.dtype == torch.float32
    torch.manual_seed(5)
    seed = int(draw_seed(torch.device("cpu")))  # the seed the layer drew
    xd, a, b = (t.detach().double().requires_grad_(True) for t in (x, ours.lora_A, ours.lora_B))
    xm = xd * keep4d(seed, xd.shape, 0.25).double() / 0.75
    w, bias = base.weight.double(), base.bias.double()
    yr = F.conv2d(xd, w, bias, padding=1) + ours.scaling * F.conv2d(F.conv2d(xm, a, padding=1), b)
    torch.testing.assert_close(y.double(), yr, atol=0.1, rtol=3e-2)
    got = (x.grad, ours.lora_A.grad, ours.lora_B.grad)
    for t, want in zip(got, torch.autograd.grad(yr, (xd, a, b), g.double()), strict=True):
        torch.testing.assert_close(t.double(), want, atol=0.05 * want.abs().max().item(), rtol=3e-2)


# ------------------------------------------------------------------ a ResNet-18 that trains


def _swap_convs(model, make):
    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.Conv2d):
                setattr(mod, cname, make(child))


def test_resnet18_with_lora_on_every_conv_trains_like_peft():
    import copy

    from peft import get_peft_model

    torch.manual_seed(0)
    net = resnet18().double()  # float64: 20 steps of SGD amplify fp32 rounding differences past any fair tolerance
    peft_net = copy.deepcopy(net)
    _swap_convs(net, lambda c: ftk.nn.LoRAConv2d(c, r=4, alpha=8))
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    targets = [n for n, m in peft_net.named_modules() if isinstance(m, nn.Conv2d)]
    peft_net = get_peft_model(peft_net, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    ours_convs = [m for m in net.modules() if isinstance(m, ftk.nn.LoRAConv2d)]
    peft_convs = [m for m in peft_net.modules() if isinstance(m, PeftConv2d)]
    assert len(ours_convs) == len(peft_convs) == 20
    with torch.no_grad():
        for o, p in zip(ours_convs, peft_convs, strict=True):
            o.lora_A.copy_(p.lora_A["default"].weight)
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    # Both train side by side from the same adapters; after each step PEFT's adapters are reset to
    # ours. Left to drift apart, 20 SGD steps through BatchNorm amplify float64 summation-order
    # differences chaotically (10% apart by step 16 on a 16-core host, equal to 1e-12 at step 2).
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (net, peft_net)]
    net.train(), peft_net.train()
    losses = []
    for _ in range(20):
        pair = []
        for model, opt in zip((net, peft_net), opts):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            pair.append(loss.item())
        assert pair[0] == pytest.approx(pair[1], rel=1e-10)
        for o, p in zip(ours_convs, peft_convs, strict=True):
            for mine, theirs in ((o.lora_A, p.lora_A["default"].weight), (o.lora_B, p.lora_B["default"].weight)):
                torch.testing.assert_close(
                    mine.grad, theirs.grad, rtol=1e-8, atol=1e-10 * theirs.grad.abs().max().item()
                )
        for opt in opts:
            opt.step()
        with torch.no_grad():
            for o, p in zip(ours_convs, peft_convs, strict=True):
                p.lora_A["default"].weight.copy_(o.lora_A)
                p.lora_B["default"].weight.copy_(o.lora_B)
        losses.append(pair[0])
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_cuda_matches_peft(dtype, p):
    ours, peft = make_pair(16, 24, 3, 2, 1, r=4, p=p, dtype=dtype)
    ours.cuda(), peft.cuda()
    seed = 55
    if p > 0:
        peft.lora_dropout["default"] = FixedMaskDropout(seed, p)
    x = torch.randn(4, 16, 19, 17, dtype=dtype, device="cuda").to(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fn = ftk.nn.lora_conv2d._UnmergedConv
    seed_t = torch.tensor(seed, device="cuda")
    # fp32 in true fp32: cuDNN's default TF32 rounds inputs to 10 bits, and a 1-ulp difference in a
    # dropped element (x * 1/(1-p) against x / (1-p)) can land on either side of that rounding.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        y = fn.apply(x1, ours.weight, ours.bias, ours.lora_A, ours.lora_B, ours.scaling, p, seed_t, ours.geom)
        yp = peft(x2)
        g = torch.randn_like(y)
        ga = torch.autograd.grad(y, (x1, ours.lora_A, ours.lora_B), g)
        gp = torch.autograd.grad(yp, (x2, peft.lora_A["default"].weight, peft.lora_B["default"].weight), g)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(y, yp, atol=tol * 4, rtol=tol)
    for a, b in zip(ga, gp, strict=True):
        torch.testing.assert_close(a, b, atol=tol * 4 * max(1.0, b.abs().max().item()), rtol=tol)


@pytest.mark.cuda
def test_cuda_dropout_stream_equals_cpu():
    x = torch.randn(2, 3, 9, 70)
    seed = 777
    cpu = dropout_op.lora_dropout(x, 0.3, torch.tensor(seed))
    xg = x.cuda().to(memory_format=torch.channels_last)
    gpu = dropout_op.lora_dropout(xg, 0.3, torch.tensor(seed, device="cuda"))
    torch.testing.assert_close(gpu.cpu(), cpu)


def test_inductor_with_fallback_random_matches_eager():
    """The default backend (inductor) on a CNN with LoRA Conv2d (dense and grouped) and Linear layers,
    dropout on: with ``fallback_random`` it draws eager's seeds, so outputs and grads match eager."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
        nn.Flatten(),
        nn.Linear(16 * 7 * 9, 5),
    )
    ftk.apply_lora(m, ["0", "2", "4"], r=8, dropout=0.2)
    for layer in (m[0], m[2], m[4]):
        with torch.no_grad():
            layer.lora_B.normal_()
    x = torch.randn(2, 8, 7, 9)
    out = []
    with inductor_config.patch(fallback_random=True):
        for f in (torch.compile(m), m):
            m.zero_grad()
            torch.manual_seed(3)
            y = f(x)
            y.square().sum().backward()
            out.append((y.detach(), [p.grad.clone() for p in m.parameters() if p.requires_grad]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(out[0][1], out[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("dora", [False, True])
def test_first_call_under_inference_mode_then_training(monkeypatch, dora):
    """A first call under ``torch.inference_mode`` (an evaluation before training) must not leave an
    inference tensor in the per-device placeholder-seed cache, which the unmerged node saves."""
    import importlib

    mod = importlib.import_module("ftkernels.nn.lora_linear")  # (ftk.nn.lora_linear is the function)
    monkeypatch.setattr(mod, "_UNUSED_SEEDS", {})
    layer = ftk.nn.LoRAConv2d(nn.Conv2d(3, 4, 3), r=2, strategy="unmerged", dora=dora)
    with torch.inference_mode():
        layer(torch.randn(1, 3, 6, 6))
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None
