"""LoRAConv1d / LoRAConv3d (LoRA on ``nn.Conv1d`` / ``nn.Conv3d``) against PEFT's ``lora.Conv1d`` /
``lora.Conv3d`` and the plain-PyTorch reference: geometries, both strategies, groups, dropout (the
fused stream), DoRA, gradcheck, merge, PEFT-format files, and Hugging Face models with such convs
(Whisper's and wav2vec2's audio front ends, VideoMAE's tubelet embedding)."""

import copy
import warnings

import pytest
import torch
from helpers.lora import check_low_precision, compare_with_peft, files_both_ways, fix_dropout, peft_random, trainable
from torch import nn

import ftkernels as ftk
from ftkernels.nn.lora_conv2d import _UnmergedConv
from ftkernels.nn.reference import lora_conv2d_reference

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
LAYERS = {1: ftk.nn.LoRAConv1d, 2: ftk.nn.LoRAConv2d, 3: ftk.nn.LoRAConv3d}
SIZES = {1: (19,), 2: (7, 9), 3: (5, 7, 6)}  # odd and even spatial sizes

GEOMETRIES = [  # kernel, stride, padding, groups
    (1, 1, 0, 1),
    (3, 1, 1, 1),
    (3, 2, 1, 1),
    (4, 3, "valid", 1),
    (3, 1, "same", 2),
    (1, 2, 0, 4),
]


def peft_model(base, targets, r=4, alpha=8, p=0.0, dora=False):
    """PEFT LoRA over a copy of ``base`` with random B (and, for DoRA, magnitudes off the row norms)."""
    return peft_random(base, targets, r=r, alpha=alpha, p=p, use_dora=dora)


@pytest.mark.parametrize("nd", [1, 3])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("strategy", ["unmerged", "merged"])
def test_matches_peft(nd, geometry, strategy):
    """Every geometry, both strategies (a grouped base always runs unmerged), float64 against PEFT:
    outputs, grad_x and the grads of A, B and the base bias."""
    k, stride, padding, groups = geometry
    torch.manual_seed(nd * 100 + k)
    base = nn.Sequential(CONVS[nd](8, 12, k, stride=stride, padding=padding, groups=groups)).double()
    peft = peft_model(base, ["0"])
    ours = ftk.from_peft(copy.deepcopy(peft))
    assert type(ours[0]) is LAYERS[nd] and ours[0].lora_B.shape == (12, 4 // groups) + (1,) * nd
    ours[0].strategy = strategy if groups == 1 else "unmerged"
    peft.base_model.model[0].base_layer.bias.requires_grad_(True)  # so the bias grads are compared too
    ours[0].base.bias.requires_grad_(True)
    compare_with_peft(ours, peft, torch.randn(3, 8, *SIZES[nd], dtype=torch.float64))
    assert ours[0].last_strategy == ours[0].strategy


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("strategy", ["unmerged", "merged"])
def test_same_padding_with_an_even_kernel_matches_peft(nd, strategy):
    """``padding="same"`` with an even kernel: torch pads ``total // 2`` before and the rest after; the
    layer pads x so before both convs (PEFT's A takes the "same" string, so torch does it there).
    Float64 against PEFT, and merged (the base conv pads its own way) equal to unmerged."""
    torch.manual_seed(30 + nd)
    kernel = {1: 4, 2: (2, 3), 3: (2, 1, 4)}[nd]
    base = nn.Sequential(CONVS[nd](5, 7, kernel, padding="same")).double()
    peft = peft_model(base, ["0"])
    ours = ftk.from_peft(copy.deepcopy(peft))
    ours[0].strategy = strategy
    x = torch.randn(2, 5, *SIZES[nd], dtype=torch.float64)
    compare_with_peft(ours, peft, x)
    assert ours[0](x).shape[2:] == x.shape[2:]
    want = ours(x)
    ftk.merge_lora(ours)
    torch.testing.assert_close(ours(x), want)


@pytest.mark.parametrize("nd", [1, 3])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dropout_and_dora_match_peft(nd, dora, p, monkeypatch):
    """Two convs (strided, then 1x1), training mode, dropout with the same mask in both (our stream's
    mask put in PEFT's dropout slot), with and without DoRA (magnitude ``[1, out, 1, ...]``); merged
    and unloaded, PEFT's merged weights."""
    torch.manual_seed(7 + nd)
    conv = CONVS[nd]
    base = nn.Sequential(conv(4, 6, 3, stride=2, padding=1), nn.Tanh(), conv(6, 5, 1)).double()
    peft = peft_model(base, ["0", "2"], r=2, alpha=3, p=p, dora=dora).train()
    ours = ftk.from_peft(copy.deepcopy(peft)).train()
    if dora:
        assert ours[0].lora_magnitude.shape == (1, 6) + (1,) * nd
    if p:
        fix_dropout(peft, 5, p)
        orig = ftk.nn.lora_conv2d.call_seed
        monkeypatch.setattr(ftk.nn.lora_conv2d, "call_seed", lambda q, dev: torch.tensor(5) if q > 0 else orig(q, dev))
    x = torch.randn(2, 4, *SIZES[nd], dtype=torch.float64)
    compare_with_peft(ours, peft, x)
    ours.eval(), peft.eval()
    want = ours(x)
    plain = ftk.unload_lora(copy.deepcopy(ours), merge=True)
    assert type(plain[0]) is type(plain[2]) is conv
    torch.testing.assert_close(plain(x), want)
    # PEFT 0.21 merges a Conv3d with a 1x1 leading kernel through its Conv2d 1x1 shortcut and fails
    # (shapes [5, 2, 1] @ [2, 6, 1]); compare the merged weights where it can merge.
    peft_layers = [0, 2] if nd == 1 else [0]
    theirs = copy.deepcopy(peft).base_model.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in peft_layers:
            theirs[i].merge()
            torch.testing.assert_close(plain[i].weight, theirs[i].base_layer.weight)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_gradcheck_against_reference(nd):
    """Dilation (PEFT's A drops it, so the plain-torch reference is the oracle), stride, groups and
    dropout together, for 1, 2 and 3 spatial dims; gradcheck through x, the base weight and bias, A
    and B."""
    base = CONVS[nd](6, 9, 3, stride=2, padding=2, dilation=2, groups=3).double()
    ours = LAYERS[nd](base, r=6, alpha=3, dropout=0.25).double()
    with torch.no_grad():
        ours.lora_B.normal_()
    x = torch.randn(2, 6, *(s + 2 for s in SIZES[nd]), dtype=torch.float64, requires_grad=True)
    w, b = base.weight.detach().clone().requires_grad_(True), base.bias.detach().clone().requires_grad_(True)
    seed = torch.tensor(9)

    def f(x, w, b, a, bb):
        return _UnmergedConv.apply(x, w, b, a, bb, ours.scaling, 0.25, seed, ours.geom)

    want = lora_conv2d_reference(x, w, b, ours.lora_A, ours.lora_B, ours.scaling, ours.geom, 0.25, 9)
    torch.testing.assert_close(f(x, w, b, ours.lora_A, ours.lora_B), want)
    assert torch.autograd.gradcheck(f, (x, w, b, ours.lora_A, ours.lora_B))


def test_channels_last_3d_and_unbatched():
    """Channels-last-3d inputs (the in-place rank update on pixel rows) and unbatched ``[C, D, H, W]`` /
    ``[C, L]`` inputs give the contiguous batched result."""
    torch.manual_seed(3)
    for nd in (1, 3):
        base = CONVS[nd](5, 7, 3, padding=1).double()
        ours = LAYERS[nd](base, r=3).double()
        with torch.no_grad():
            ours.lora_B.normal_()
        x = torch.randn(2, 5, *SIZES[nd], dtype=torch.float64)
        want = lora_conv2d_reference(x, ours.weight, ours.bias, ours.lora_A, ours.lora_B, ours.scaling, ours.geom)
        for strategy in ("unmerged", "merged"):
            ours.strategy = strategy
            torch.testing.assert_close(ours(x), want)
            torch.testing.assert_close(ours(x[1]), want[1])
            if nd == 3:
                y = ours(x.contiguous(memory_format=torch.channels_last_3d))
                torch.testing.assert_close(y, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_base_against_float64(dtype):
    """An fp32 or bf16 base with fp32 adapters: the output in the base's dtype, the adapters' grads in
    fp32, both close to the float64 result."""
    torch.manual_seed(4)
    base = nn.Conv3d(6, 8, 3, stride=(1, 2, 2), padding=1).double()
    ours = ftk.nn.LoRAConv3d(base, r=4).double()
    with torch.no_grad():
        ours.lora_B.normal_(std=0.3)
    x = torch.randn(2, 6, 4, 9, 8, dtype=torch.float64)
    check_low_precision(ours, x, dtype, 1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("nd", [1, 3])
def test_adapter_files_both_ways(nd, tmp_path):
    """apply_lora + save_adapter loads in PEFT (same outputs); PEFT's file loads into ours."""
    torch.manual_seed(5)
    conv = CONVS[nd]
    base = nn.Sequential(conv(3, 6, 3, padding=1), nn.ReLU(), conv(6, 4, 1, groups=2)).eval()
    peft = peft_model(base, ["0", "2"]).eval()
    mine = files_both_ways(base, peft, torch.randn(2, 3, *SIZES[nd]), tmp_path)
    assert [type(m) for m in (mine[0], mine[2])] == [LAYERS[nd]] * 2
    applied = ftk.apply_lora(copy.deepcopy(base), ["0", "2"], r=4, alpha=8)
    assert [type(m) for m in (applied[0], applied[2])] == [LAYERS[nd]] * 2
    assert sorted(n for n, q in applied.named_parameters() if q.requires_grad) == [
        "0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"
    ]  # fmt: skip


def test_bad_input_and_refusals():
    """Wrong channels / rank / device type, a Conv2d given to the 3d layer, a reflect-padded base, and
    PEFT's undilated A on a dilated ``padding="same"`` conv (it runs, computing something else) are
    refused with clear errors."""
    layer = ftk.nn.LoRAConv1d(nn.Conv1d(4, 6, 3), r=2)
    with pytest.raises(ValueError, match=r"expected \[N, 4, L\]"):
        layer(torch.randn(2, 5, 9))
    with pytest.raises(ValueError, match=r"expected \[N, 4, L\]"):
        layer(torch.randn(2, 4, 9, 9))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, 4, 9, dtype=torch.long))
    with pytest.raises(TypeError, match=r"LoRAConv3d wraps an nn.Conv3d, got Conv2d"):
        ftk.nn.LoRAConv3d(nn.Conv2d(4, 6, 3))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        ftk.nn.LoRAConv1d(nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="multiple of it"):
        ftk.nn.LoRAConv3d(nn.Conv3d(4, 6, 1, groups=2), r=3)
    model = nn.Sequential(nn.Conv1d(4, 6, 3, padding="same", dilation=2))
    peft = peft_model(model, ["0"])
    assert peft.base_model.model[0].lora_A["default"].dilation == (1,)
    with pytest.raises(NotImplementedError, match="dilation"):
        ftk.from_peft(peft)
    assert hasattr(peft.base_model.model[0], "base_layer")  # unchanged
    ours = ftk.apply_lora(copy.deepcopy(model), ["0"], r=2)  # our own layer gives A the dilation
    assert ours[0].geom == ((1,), (2,), (2,), 1)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_weight_normed_base_is_read_once_per_call(dora, p, monkeypatch):
    """A weight-normed base (EnCodec, wav2vec2's positional conv) computes its weight at each read: a
    call reads it once (the checks, the casts and DoRA's norms share it), as the plain conv does."""
    from torch.nn.utils.parametrizations import _WeightNorm, weight_norm

    layer = ftk.nn.LoRAConv1d(weight_norm(nn.Conv1d(4, 6, 3)), r=2, dropout=p, dora=dora).train()
    calls = []
    orig = _WeightNorm.forward
    monkeypatch.setattr(_WeightNorm, "forward", lambda self, g, v: calls.append(1) or orig(self, g, v))
    layer(torch.randn(2, 4, 9)).sum().backward()
    assert len(calls) == 1


def _hf_model(name):
    """Tiny Hugging Face models whose convs are Conv1d (Whisper's two input convs, wav2vec2's feature
    encoder and its grouped, weight-normed positional conv) or Conv3d (VideoMAE's tubelet embedding), with an input."""
    import transformers as T

    if name == "whisper":
        cfg = T.WhisperConfig(
            d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=12, max_target_positions=8,
            vocab_size=50, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        )  # fmt: skip
        model = T.WhisperModel(cfg).get_encoder()
        return model, {"input_features": torch.randn(2, 8, 24, dtype=torch.float64)}
    if name == "wav2vec2":
        cfg = T.Wav2Vec2Config(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
            conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=4,
            feat_extract_norm="layer",
        )  # fmt: skip
        return T.Wav2Vec2Model(cfg), {"input_values": torch.randn(2, 400, dtype=torch.float64)}
    cfg = T.VideoMAEConfig(
        image_size=16, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32,
    )  # fmt: skip
    return T.VideoMAEModel(cfg), {"pixel_values": torch.randn(2, 4, 3, 16, 16, dtype=torch.float64)}


@pytest.mark.parametrize("name", ["whisper", "wav2vec2", "videomae"])
def test_hf_models_match_peft(name):
    """LoRA on every Conv1d / Conv3d PEFT accepts (r=4; groups dividing it) plus the attention's q/v,
    float64, eval mode: the same layers as PEFT's, the same output and every adapter grad. Whisper's
    encoder reads ``conv1.stride``: PEFT's layer fails there, ours runs (PEFT gets a shim here)."""
    torch.manual_seed(0)
    base, inputs = _hf_model(name)
    base = base.double().eval()
    convs = [n for n, m in base.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv3d)) and 4 % m.groups == 0]
    assert convs
    names = convs + [n for n, _ in base.named_modules() if n.endswith(("q_proj", "v_proj", "query", "value"))]
    peft = peft_model(base, names).eval()
    ours = ftk.from_peft(copy.deepcopy(peft)).eval()
    applied = ftk.apply_lora(copy.deepcopy(base), names, r=4, alpha=8)
    assert set(ftk.peft_compat.lora_modules(applied)) == set(ftk.peft_compat.lora_modules(ours)) == set(names)
    assert any(isinstance(m, (ftk.nn.LoRAConv1d, ftk.nn.LoRAConv3d)) for m in ours.modules())
    if name == "whisper":  # its encoder reads conv1.stride, which PEFT's layer lacks (ours has it)
        with pytest.raises(AttributeError, match="no attribute 'stride'"):
            peft(**inputs)
        for m in peft.modules():
            if isinstance(getattr(m, "base_layer", None), nn.Conv1d):
                m.stride = m.base_layer.stride  # test-only shim, so PEFT can be the oracle
    y, yp = ours(**inputs).last_hidden_state, peft(**inputs).last_hidden_state
    assert (yp - base(**inputs).last_hidden_state).abs().max() > 1e-3 * yp.abs().max()  # the adapters count
    torch.testing.assert_close(y, yp, rtol=1e-10, atol=1e-12 * yp.abs().max().item())
    g = torch.randn_like(y)
    mine, theirs = trainable(ours), trainable(peft)
    assert set(mine) == set(theirs)
    ga = torch.autograd.grad(y, list(mine.values()), g, allow_unused=True)
    gp = torch.autograd.grad(yp, [theirs[n] for n in mine], g, allow_unused=True)
    for n, a, b in zip(mine, ga, gp, strict=True):
        assert (a is None) == (b is None), n
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10 * b.abs().max().item(), msg=n)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_compiles_without_graph_breaks_and_matches_eager(nd):
    """A dense and a grouped LoRA conv (1, 2 or 3 spatial dims) with dropout traced whole (fullgraph):
    outputs and adapter grads equal eager's for the same seed (aot_eager keeps torch's RNG; under
    inductor set ``torch._inductor.config.fallback_random`` for that)."""
    torch.manual_seed(0)
    conv = CONVS[nd]
    m = nn.Sequential(conv(4, 8, 3, padding=1), nn.ReLU(), conv(8, 8, 3, padding=1, groups=4))
    ftk.apply_lora(m, ["0", "2"], r=4, dropout=0.2)
    for layer in (m[0], m[2]):
        with torch.no_grad():
            layer.lora_B.normal_()
    x = torch.randn(2, 4, *SIZES[nd])
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    out = []
    for f in (compiled, m):
        m.zero_grad()
        torch.manual_seed(3)
        y = f(x)
        y.square().sum().backward()
        out.append((y.detach(), [p.grad.clone() for p in m.parameters() if p.requires_grad]))
    torch.testing.assert_close(out[0][0], out[1][0])
    assert len(out[0][1]) == 4
    for a, b in zip(out[0][1], out[1][1], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("nd", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_cuda_against_float64_cpu(nd, dtype, p, monkeypatch):
    """On the GPU (channels-last-3d for Conv3d; Triton's dropout stream folds its D and H dims), with
    the module's own strategy choice, against the float64 CPU layer with the same dropout seed."""
    torch.manual_seed(21)
    base = CONVS[nd](8, 12, 3, stride=2, padding=1).double()
    ref = LAYERS[nd](base, r=4, alpha=8, dropout=p).double().train()
    with torch.no_grad():
        ref.lora_B.normal_(std=0.3)
    ours = copy.deepcopy(ref).cuda()
    ours.base.to(dtype)
    ours.lora_A.data, ours.lora_B.data = ours.lora_A.data.float(), ours.lora_B.data.float()
    monkeypatch.setattr(ftk.nn.lora_conv2d, "call_seed", lambda q, dev: torch.tensor(31, device=dev))
    x = torch.randn(2, 8, *(2 * s + 1 for s in SIZES[nd]), dtype=torch.float64)
    xg = x.to("cuda", dtype)
    if nd == 3:
        xg = xg.contiguous(memory_format=torch.channels_last_3d)
    want = ref(x)
    g = torch.randn_like(want)
    ra, rb = torch.autograd.grad(want, (ref.lora_A, ref.lora_B), g)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        y = ours(xg)
        ga, gb = torch.autograd.grad(y, (ours.lora_A, ours.lora_B), g.to("cuda", dtype))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for got, r in ((y, want), (ga, ra), (gb, rb)):
        assert (got.cpu().double() - r).abs().max() <= tol * r.abs().max()
