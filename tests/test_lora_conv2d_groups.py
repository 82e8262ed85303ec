"""LoRAConv2d on grouped base convs (ResNeXt, depthwise): PEFT's layout (A dense over all input
channels, B a 1x1 conv with the base's groups, r a multiple of groups), against PEFT and the
plain-torch reference; no merging (the delta is not a grouped weight), refused before anything changes."""

import copy
import warnings

import pytest
import torch
from helpers.lora import FixedMaskDropout, check_low_precision, paired_conv_inputs
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Conv2d as PeftConv2d
from torch import nn

import ftkernels as ftk
from ftkernels.nn.lora_conv2d import _UnmergedConv
from ftkernels.nn.reference import lora_conv2d_reference

CASES = [  # cin, cout, k, stride, padding, groups, r, N, H, W
    (8, 12, 3, 2, 1, 4, 8, 2, 11, 9),  # ResNeXt-style grouped 3x3, strided
    (6, 6, 3, 1, 1, 6, 6, 1, 9, 8),  # depthwise
    (4, 8, 1, 1, 0, 2, 2, 2, 5, 7),  # grouped 1x1
    (6, 3, 5, 1, 2, 3, 9, 1, 8, 10),  # out/groups = 1, r/groups = 3
]


def make_pair(cin, cout, k, stride, padding, groups, r, p=0.0, dtype=torch.float64):
    base = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups).to(dtype)
    pb = copy.deepcopy(base)
    ours = ftk.nn.LoRAConv2d(base, r=r, alpha=2 * r, dropout=p).to(dtype)
    with torch.no_grad():
        ours.lora_B.normal_()
    with warnings.catch_warnings():  # PEFT warns that a grouped conv's adapter cannot be merged
        warnings.simplefilter("ignore")
        peft = PeftConv2d(
            pb, "default", config=LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p), r=r, lora_alpha=2 * r
        )
    with torch.no_grad():
        peft.lora_A["default"].weight.copy_(ours.lora_A)
        peft.lora_B["default"].weight.copy_(ours.lora_B)
    return ours, peft.to(dtype)


def grads(y, g, *ts):
    return torch.autograd.grad(y, ts, g)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_matches_peft(case, channels_last):
    cin, cout, k, stride, padding, groups, r, n, h, w = case
    ours, peft = make_pair(cin, cout, k, stride, padding, groups, r)
    assert ours.lora_B.shape == peft.lora_B["default"].weight.shape == (cout, r // groups, 1, 1)
    x1, x2 = paired_conv_inputs(ours, peft, (n, cin, h, w), channels_last)
    y, yp = ours(x1), peft(x2)
    assert ours.last_strategy == "unmerged"  # auto never merges a grouped base
    torch.testing.assert_close(y, yp)
    assert (y - ours.base(x1)).abs().max() > 0.1  # the adapter path is live
    g = torch.randn_like(y)
    ga = grads(y, g, x1, ours.lora_A, ours.lora_B, ours.base.bias)
    gp = grads(yp, g, x2, peft.lora_A["default"].weight, peft.lora_B["default"].weight, peft.base_layer.bias)
    for a, b in zip(ga, gp, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", CASES[:2])
def test_grouped_dropout_matches_peft_with_the_same_mask(case):
    cin, cout, k, stride, padding, groups, r, n, h, w = case
    ours, peft = make_pair(cin, cout, k, stride, padding, groups, r, p=0.3)
    peft.lora_dropout["default"] = FixedMaskDropout(77, 0.3)
    x = torch.randn(n, cin, h, w, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = _UnmergedConv.apply(
        x1, ours.weight, ours.bias, ours.lora_A, ours.lora_B, ours.scaling, 0.3, torch.tensor(77), ours.geom
    )
    yp = peft(x2)
    torch.testing.assert_close(y, yp)
    g = torch.randn_like(y)
    ga = grads(y, g, x1, ours.lora_A, ours.lora_B)
    gp = grads(yp, g, x2, peft.lora_A["default"].weight, peft.lora_B["default"].weight)
    for a, b in zip(ga, gp, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_low_precision_against_float64(dtype):
    """fp32 adapters on an fp32 or bf16 base (the adapters stay fp32 and get fp32 grads)."""
    ours, _ = make_pair(16, 32, 3, 1, 1, 8, 16, dtype=torch.float64)
    x = torch.randn(4, 16, 12, 12, dtype=torch.float64)
    want = lora_conv2d_reference(x, ours.weight, ours.bias, ours.lora_A, ours.lora_B, ours.scaling, ours.geom)
    torch.testing.assert_close(ours(x), want)  # the float64 layer is the reference's
    check_low_precision(ours, x, dtype, 2e-5 if dtype == torch.float32 else 3e-2)


def test_grouped_cannot_merge_and_nothing_changes():
    ours, _ = make_pair(8, 12, 3, 1, 1, 4, 8)
    assert not ours.can_merge
    with pytest.raises(NotImplementedError, match="grouped"):
        ours.merge()
    with pytest.raises(NotImplementedError, match="grouped"):
        ours.delta_weight()
    ours.strategy = "merged"
    with pytest.raises(ValueError, match="ungrouped"):
        ours(torch.randn(1, 8, 5, 5, dtype=torch.float64))
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=4)).double()
    ftk.apply_lora(model, ["0", "1"], r=4)
    w0 = model[0].base.weight.detach().clone()
    for fn in (ftk.merge_lora, lambda m: ftk.unload_lora(m, merge=True)):
        with pytest.raises(
            NotImplementedError, match=r"cannot merge 1 layer\(s\) \(1: a grouped base conv.*nothing was changed"
        ):
            fn(model)
        assert isinstance(model[0], ftk.nn.LoRAConv2d) and not model[0].merged
        assert torch.equal(model[0].base.weight, w0)
    plain = ftk.unload_lora(model, merge=False)
    assert type(plain[1]) is nn.Conv2d and torch.equal(plain[0].weight, w0)


def test_rank_not_a_multiple_of_groups_is_refused_like_peft():
    conv = nn.Conv2d(6, 6, 3, groups=3)
    with pytest.raises(ValueError, match="r must be a multiple of it.*got r=4"):
        ftk.nn.LoRAConv2d(conv, r=4)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), conv)
    with pytest.raises(ValueError, match="multiple"):
        ftk.apply_lora(model, ["0", "1"], r=4)
    assert type(model[0]) is nn.Conv2d  # nothing swapped


class ResNeXtBlock(nn.Module):
    """A bottleneck with a grouped 3x3 (cardinality 4) and a depthwise conv, as in ResNeXt / ConvNeXt."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 1, bias=False)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv3 = nn.Conv2d(16, 8, 1, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.dw(torch.relu(self.conv2(h))))
        return self.head((x + self.conv3(h)).mean((2, 3)))


def test_resnext_block_trains_like_peft_and_adapters_round_trip(tmp_path):
    torch.manual_seed(0)
    base = ResNeXtBlock()
    targets = ["conv1", "conv2", "dw", "conv3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=8, target_modules=targets))
    ours = ftk.from_peft(copy.deepcopy(peft))
    for name in targets:
        assert isinstance(ours.get_submodule(name), ftk.nn.LoRAConv2d)
    opt_p = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    opt_o = ftk.optim.FusedAdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        x, t = torch.randn(4, 8, 9, 9), torch.randint(0, 3, (4,))
        for model, opt in ((peft, opt_p), (ours, opt_o)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), t).backward()
            opt.step()
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(ours(x), peft(x), atol=1e-5, rtol=1e-4)
    # save in PEFT's format, load into PEFT and back into ours: the same outputs
    ftk.save_adapter(ours, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    mine = ftk.load_adapter(copy.deepcopy(base), str(tmp_path))
    want = ours(x)
    torch.testing.assert_close(loaded(x), want)
    torch.testing.assert_close(mine(x), want)


def test_peft_adapter_with_a_rank_pattern_on_grouped_convs_loads(tmp_path):
    """PEFT saves B as [out, r / groups, 1, 1]; a per-layer rank (rank_pattern) on a grouped conv
    changes both A's and B's shapes: load_adapter takes it and gives PEFT's outputs."""
    torch.manual_seed(1)
    base = ResNeXtBlock()
    cfg = LoraConfig(
        r=16, lora_alpha=8, target_modules=["conv2", "dw"], rank_pattern={"conv2": 8}, init_lora_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(copy.deepcopy(base), cfg)
    peft.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():  # layers made by the load: no "build the optimizer after" warning
        warnings.simplefilter("error")
        mine = ftk.load_adapter(copy.deepcopy(base), str(tmp_path))
    assert (mine.conv2.r, tuple(mine.conv2.lora_B.shape)) == (8, (16, 2, 1, 1))
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(mine(x), peft(x))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_cuda_grouped_against_float64(dtype, p):
    """The layer's own forward on CUDA (auto strategy: unmerged, fused dropout stream on the GPU)
    against the float64 CPU reference with the same seed."""
    ours, _ = make_pair(32, 48, 3, 1, 1, 8, 16, p=p, dtype=torch.float64)
    x = torch.randn(4, 32, 15, 13, dtype=torch.float64)
    seed = 31
    want = lora_conv2d_reference(x, ours.weight, ours.bias, ours.lora_A, ours.lora_B, ours.scaling, ours.geom, p, seed)
    ours.cuda().to(dtype)
    xg = x.to("cuda", dtype).requires_grad_(True)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        y = _UnmergedConv.apply(
            xg,
            ours.weight,
            ours.bias,
            ours.lora_A,
            ours.lora_B,
            ours.scaling,
            p,
            torch.tensor(seed, device="cuda"),
            ours.geom,
        )
        y.sum().backward()
        ours.zero_grad()
        ours(xg).sum().backward()  # the module's own path runs unmerged on a grouped base
    assert ours.last_strategy == "unmerged" and ours.lora_A.grad is not None
    tol = {torch.float32: 2e-4, torch.bfloat16: 4e-2}[dtype]
    torch.testing.assert_close(y.double().cpu(), want, atol=tol * 10, rtol=tol)


def test_hf_regnet_grouped_convs_match_peft():
    """Hugging Face RegNet-Y (grouped 3x3 convs, groups 2 and 4 here) with LoRA on every block conv:
    the same layers as PEFT's, the same outputs and adapter grads."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 2], groups_width=8, layer_type="y")
    base = T.RegNetModel(cfg).eval()
    targets = r".*layer\.\d+\.convolution"
    ours = ftk.apply_lora(copy.deepcopy(base), targets, r=4, alpha=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets)).eval()
    layers = ftk.peft_compat.lora_modules(ours)
    theirs = {n.removeprefix("base_model.model."): m for n, m in peft.named_modules() if hasattr(m, "base_layer")}
    assert set(layers) == set(theirs) and {m.base.groups for m in layers.values()} == {1, 2, 4}
    with torch.no_grad():
        for n, layer in layers.items():
            theirs[n].lora_B["default"].weight.normal_(std=0.1)
            layer.lora_A.copy_(theirs[n].lora_A["default"].weight)
            layer.lora_B.copy_(theirs[n].lora_B["default"].weight)
    x = torch.randn(2, 3, 32, 32)
    y, yp = ours(pixel_values=x).pooler_output, peft(pixel_values=x).pooler_output
    torch.testing.assert_close(y, yp, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    yp.square().sum().backward()
    for n, layer in layers.items():
        torch.testing.assert_close(layer.lora_A.grad, theirs[n].lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.grad, theirs[n].lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
