"""LoRA over quantized Linears (QLoRA: bitsandbytes, torchao): the fused delta node against the float64
reference and gradcheck (CPU and CUDA), the layer against PEFT's ``lora.bnb`` / torchao layers, whole
quantized models (apply_lora, from_peft, adapter files both ways, merge, gradient checkpointing, Trainer),
QDoRA, and refusals. The bitsandbytes tests skip where it is not installed (the GPU machine)."""

import copy
import importlib.util
import warnings

import pytest
import torch
from helpers.lora import FixedMaskDropout, quantized
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import ftkernels as ftk
from ftkernels.nn.dora import dora_combine
from ftkernels.nn.lora_quant import LoRAQuantLinear, quant_kind
from ftkernels.nn.reference import lora_linear_reference
from ftkernels.ops.lora_quant import lora_delta
from ftkernels.peft_compat import lora_modules

BNB = importlib.util.find_spec("bitsandbytes") is not None
if BNB:
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    from peft.tuners.lora.bnb import Linear8bitLt as PeftLinear8bitLt
needs_bnb = pytest.mark.skipif(not BNB, reason="bitsandbytes is not installed")
CUDA = torch.cuda.is_available()

KINDS = ["nf4", "fp4", "int8"]


def pair(K, N, kind, r=4, p=0.0, bias=True, compute=torch.float32, dora=False):
    """(ours, PEFT's) over copies of one quantized layer, the same random A and B (B not zero) and, for
    DoRA, the same magnitude (off the row norms)."""
    base = quantized(K, N, kind, bias, compute)
    ours = LoRAQuantLinear(copy.deepcopy(base), r=r, alpha=2 * r, dropout=p, dora=dora)
    cls = PeftLinear8bitLt if kind == "int8" else PeftLinear4bit
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, use_dora=dora)
    peft = cls(base, "default", config=cfg, r=r, lora_alpha=2 * r)
    _share_adapters(ours, peft, dora)
    return ours, peft


@torch.no_grad()
def _share_adapters(ours, peft, dora):
    """PEFT's layer given ours's A and a random B (not zero) and, for DoRA, a magnitude moved off the row
    norms (checked equal at init first)."""
    ours.lora_B.normal_()
    peft.lora_A["default"].weight.copy_(ours.lora_A)
    peft.lora_B["default"].weight.copy_(ours.lora_B)
    if dora:
        torch.testing.assert_close(ours.lora_magnitude, peft.lora_magnitude_vector["default"].weight)
        ours.lora_magnitude.mul_(1 + 0.2 * torch.randn_like(ours.lora_magnitude))
        peft.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude)


def _compare_layers(ours, peft, x, p, dora, tol):
    """One forward and backward of ours and PEFT's layer on x (the same dropout mask): outputs and the
    grads of x, A, B (and the magnitude) within ``tol``; returns ours's output."""
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, seed = seeded(ours, x1)
    if p > 0:
        peft.lora_dropout["default"] = FixedMaskDropout(seed, p)
    yp = peft(x2)
    assert y.dtype == yp.dtype
    torch.testing.assert_close(y, yp, rtol=tol, atol=tol)
    g = torch.randn_like(y)
    mine = [x1, ours.lora_A, ours.lora_B] + ([ours.lora_magnitude] if dora else [])
    theirs = [x2, peft.lora_A["default"].weight, peft.lora_B["default"].weight]
    theirs += [peft.lora_magnitude_vector["default"].weight] if dora else []
    for a, b in zip(torch.autograd.grad(y, mine, g), torch.autograd.grad(yp, theirs, g), strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())
    return y


def seeded(layer, x, seed=7):
    """``layer(x)`` with the default generator at ``seed``, and the dropout seed that call draws."""
    torch.manual_seed(seed)
    drawn = int(torch.randint(0, 2**62, ()))
    torch.manual_seed(seed)
    return layer(x), drawn


def delta_reference(x, a, b, s, p, seed):
    """``s (D(x) A^T) B^T`` in float64: the plain-PyTorch LoRA oracle (its mask from the NumPy Philox
    stream) over a zero base weight."""
    w = torch.zeros(b.shape[0], x.shape[-1], dtype=torch.float64)
    return lora_linear_reference(x.double(), w, None, a.double(), b.double(), s, p, seed)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_delta_gradcheck(p):
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(11)
    fn = lambda x, a, b: lora_delta(x, a, b, 1.5, p, seed, torch.float64, torch.float64)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b))
    torch.testing.assert_close(fn(x, a, b), delta_reference(x, a, b, 1.5, p, 11))


DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_delta_in_fp32_from_low_precision_inputs(xdtype, p, device):
    """fp32 adapters on a 16-bit x: computed in fp32, returned in x's dtype, grads in each one's dtype
    (on CUDA the dropout runs the Triton kernel: the same mask)."""
    x = torch.randn(37, 19).to(xdtype).to(device).requires_grad_(True)
    a = torch.randn(5, 19, device=device, requires_grad=True)
    b = torch.randn(11, 5, device=device, requires_grad=True)
    y = lora_delta(x, a, b, 0.5, p, torch.tensor(3, device=device), torch.float32, xdtype)
    assert y.dtype == xdtype
    g = torch.randn_like(y)
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), g)
    assert (gx.dtype, ga.dtype, gb.dtype) == (xdtype, torch.float32, torch.float32)
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (x, a, b)]
    want = delta_reference(*leaves[:1], *leaves[1:], 0.5, p, 3)
    tol = 1e-5 if xdtype == torch.float32 and device == "cpu" else 1e-2  # (TF32 on CUDA)
    for got, ref in zip((y, gx, ga, gb), (want, *torch.autograd.grad(want, leaves, g.cpu().double())), strict=True):
        assert (got.cpu().double() - ref).abs().max() <= tol * ref.abs().max()


def test_dora_combine_gradcheck():
    """(Q)DoRA's sum ``y + (mns - 1) t + mns d`` with ``d = s u B^T``: the magnitude's gradient takes d's part
    from u and B (d is not kept), float64 gradcheck in y, t, d and mns."""
    u, b = torch.randn(6, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    d = (0.7 * u @ b.t()).view(2, 3, 5).requires_grad_(True)
    y, t = (torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mns = (1 + 0.1 * torch.randn(5, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y, t, d, m: dora_combine(y, t, d, u, b, m, 0.7), (y, t, d, mns))


def test_delta_keeps_no_copy_of_x():
    """What the node saves: x itself (the base layer keeps it too) and r-wide tensors, never a dropped or
    fp32 copy of x (PEFT's lora_A keeps one, twice x's bytes for a bf16 x)."""
    x = torch.randn(64, 48, dtype=torch.bfloat16, requires_grad=True)
    a, b = torch.randn(4, 48, requires_grad=True), torch.randn(32, 4, requires_grad=True)
    big = []

    def pack(t):
        if t.numel() >= x.numel():
            big.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_delta(x, a, b, 2.0, 0.2, torch.tensor(5), torch.float32, torch.bfloat16)
    assert big and all(t.data_ptr() == x.data_ptr() for t in big)


@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize(("lead", "K", "N", "bias"), [((5,), 64, 48, True), ((2, 3), 128, 40, False)])
@pytest.mark.parametrize("dora", [False, True])
def test_layer_matches_peft(kind, p, lead, K, N, bias, dora):
    """LoRA and QDoRA (a trained magnitude over the dequantized weight's row norms) as PEFT's lora.bnb
    layers: outputs and grads of x, A, B (and the magnitude)."""
    ours, peft = pair(K, N, kind, p=p, bias=bias, dora=dora)
    _compare_layers(ours, peft, torch.randn(*lead, K), p, dora, 1e-5)
    assert ours.base.weight.grad is None and not ours.base.weight.requires_grad


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_with_a_16bit_model_and_under_autocast(dtype):
    """A 16-bit x without autocast: the adapter path in fp32 (the adapters' dtype), out in x's dtype; under
    CPU autocast in autocast's dtype; both as PEFT (within 16-bit rounding)."""
    ours, peft = pair(64, 32, "nf4", compute=dtype)
    x = torch.randn(6, 64).to(dtype)
    y, yp = ours(x), peft(x)
    assert y.dtype == dtype
    # (one 16-bit rounding of the base output and of the delta, which the sum can cancel: an ulp of the
    # largest output, as one tolerance)
    torch.testing.assert_close(y, yp, rtol=1e-2, atol=1e-2 * yp.abs().max().item())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yp = ours(x.float()), peft(x.float())
    assert y.dtype == yp.dtype
    torch.testing.assert_close(y, yp, rtol=2e-2, atol=2e-2)


@needs_bnb
def test_plain_ops_path_equals_the_node():
    """Under :func:`ftkernels.plain_ops` (torch.func transforms) the same math and mask, to any order."""
    ours, _ = pair(32, 24, "nf4", p=0.3)
    x = torch.randn(4, 32, requires_grad=True)
    y, _ = seeded(ours, x)
    with ftk.plain_ops():
        y2, _ = seeded(ours, x)
    torch.testing.assert_close(y, y2)
    g = torch.randn_like(y)
    for a, b in zip(
        torch.autograd.grad(y, (x, ours.lora_A), g), torch.autograd.grad(y2, (x, ours.lora_A), g), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _tiny_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=120,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "base"))
    return str(tmp_path / "base")


def _load_4bit(path, kind="nf4"):
    """The saved model loaded quantized: 4-bit (``kind`` nf4 / fp4) or 8-bit (``"int8"``)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind == "int8":
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type=kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=q)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_model_from_peft_and_files_both_ways(kind, tmp_path):
    """Outputs and grads equal PEFT's. (PEFT's new layers train over bases left in eval, which
    bitsandbytes' int8 layers compute otherwise: from_peft keeps that too.)"""
    path = _tiny_llama(tmp_path)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    load = lambda: _load_4bit(path, kind)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(load(), cfg)
    ids = torch.randint(0, 120, (2, 9))
    want = peft(input_ids=ids, labels=ids)
    want.loss.backward()
    ours = ftk.from_peft(copy.deepcopy(peft))
    layers = lora_modules(ours)
    assert len(layers) == 14 and all(isinstance(m, LoRAQuantLinear) for m in layers.values())
    assert all(m._lora_group is None for m in layers.values())  # q/k/v read one x, but run alone
    got = ours(input_ids=ids, labels=ids)
    got.loss.backward()
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    q, qp = ours.model.layers[1].self_attn.q_proj, peft.base_model.model.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(q.lora_A.grad, qp.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-7)
    # PEFT's file into a fresh quantized model, and ours back into PEFT
    peft.save_pretrained(str(tmp_path / "peft"))
    mine = ftk.load_adapter(load(), str(tmp_path / "peft"))
    torch.testing.assert_close(mine(input_ids=ids).logits, want.logits, rtol=1e-5, atol=1e-5)
    ftk.save_adapter(mine, str(tmp_path / "ours"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(load(), str(tmp_path / "ours"), is_trainable=True)
    # (in train mode: once in eval, bitsandbytes repacks a CPU weight for another kernel, which rounds)
    torch.testing.assert_close(back(input_ids=ids).logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.eval()(input_ids=ids).logits, peft.eval()(input_ids=ids).logits)


@needs_bnb
def test_qlora_training_follows_peft(tmp_path):
    """apply_lora + FusedAdamW on a 4-bit model (after PEFT's prepare_model_for_kbit_training) against
    get_peft_model + torch AdamW from the same adapters: 5 steps, the same losses and adapters."""
    from peft import prepare_model_for_kbit_training

    path = _tiny_llama(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = prepare_model_for_kbit_training(_load_4bit(path), use_gradient_checkpointing=False)
        peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ours = ftk.apply_lora(base, target_modules="all-linear", r=4, alpha=8)
    mine, theirs = dict(lora_modules(ours)), {}
    for n, m in peft.base_model.model.named_modules():
        if n in mine:
            theirs[n] = m
            with torch.no_grad():
                mine[n].lora_A.copy_(m.lora_A["default"].weight)
    assert set(theirs) == set(mine) and len(mine) == 14
    opt = ftk.optim.FusedAdamW([q for q in ours.parameters() if q.requires_grad], lr=1e-2)
    ref = torch.optim.AdamW([q for q in peft.parameters() if q.requires_grad], lr=1e-2)
    for step in range(5):
        ids = torch.randint(0, 120, (2, 11))
        for model, o in ((ours, opt), (peft, ref)):
            o.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            o.step()
            if model is ours:
                mine_loss = loss.item()
        assert mine_loss == pytest.approx(loss.item(), rel=1e-5), step
    for n, m in mine.items():
        torch.testing.assert_close(m.lora_B, theirs[n].lora_B["default"].weight, rtol=1e-4, atol=1e-6)


@needs_bnb
def test_gradient_checkpointing_redraws_the_same_mask(tmp_path):
    """QLoRA runs with gradient checkpointing: the recomputed forward must drop what the first one did."""
    path = _tiny_llama(tmp_path)
    ids = torch.randint(0, 120, (2, 9))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)  # (the same A and B in both runs)
        model = ftk.apply_lora(_load_4bit(path), target_modules=["q_proj", "down_proj"], r=4, dropout=0.3)
        for m in lora_modules(model).values():
            nn.init.normal_(m.lora_B)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(2)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([m.lora_A.grad for m in lora_modules(model).values()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dora", [False, True])
def test_merge_requantizes_as_peft(kind, dora):
    ours, peft = pair(64, 48, kind, dora=dora)
    x = torch.randn(5, 64)
    unmerged = ours(x)
    with pytest.warns(UserWarning, match="quantized again"):
        ours.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.merge()
    assert ours.merged and quant_kind(ours.base) is not None
    torch.testing.assert_close(ours.base.weight.data, peft.base_layer.weight.data)  # the same quantized bits
    torch.testing.assert_close(ours(x), peft(x))
    assert (ours(x) - unmerged).abs().max() <= 0.2 * unmerged.abs().max()  # 4-bit rounding only
    with pytest.warns(UserWarning, match="quantized again"):
        ours.unmerge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.unmerge()
    torch.testing.assert_close(ours.base.weight.data, peft.base_layer.weight.data)
    torch.testing.assert_close(ours(x), peft(x))


@needs_bnb
def test_unload_keeps_a_quantized_model(tmp_path):
    path = _tiny_llama(tmp_path)
    model = ftk.apply_lora(_load_4bit(path), target_modules=["q_proj"], r=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = ftk.unload_lora(model, merge=True)
    q = plain.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and type(q.weight).__name__ == "Params4bit"


@needs_bnb
def test_refusals():
    base = quantized(32, 16, "nf4")
    with pytest.raises(TypeError, match="wraps a bitsandbytes"):
        LoRAQuantLinear(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="Params4bit"):  # the plain fused layer names what it got
        ftk.nn.LoRALinear(base)
    layer = LoRAQuantLinear(base, r=2)
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(3, 31))
    fresh = bnb.nn.Linear4bit(32, 16)  # never moved: not quantized yet
    with pytest.raises(NotImplementedError, match="not quantized yet"):
        LoRAQuantLinear(fresh, r=2).merge()


@needs_bnb
def test_peft_qdora_converts():
    """A PEFT QDoRA model (plain lora.Linear over a bitsandbytes layer: the model is not flagged as loaded
    in 4 bit) converts with its magnitude, same outputs."""
    base = nn.Sequential(quantized(32, 16, "nf4"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], use_dora=True, init_lora_weights=False))
    x = torch.randn(4, 32)
    want = peft(x)
    ours = ftk.from_peft(peft)
    assert isinstance(ours[0], LoRAQuantLinear) and ours[0].dora
    torch.testing.assert_close(ours(x), want)


@needs_bnb
def test_trainer_takes_a_qlora_model_and_still_refuses_a_bare_quantized_one(tmp_path):
    """transformers' Trainer refuses a quantized model without PEFT's adapters ("purely quantized");
    with fused LoRA layers it trains (and resumes from a checkpoint, dropout masks included)."""
    from transformers import Trainer, TrainingArguments

    from ftkernels.integrations.hf import AdapterCheckpoints

    path = _tiny_llama(tmp_path)
    ds = [{"input_ids": torch.randint(0, 120, (8,)), "labels": torch.randint(0, 120, (8,))} for _ in range(8)]

    def run(steps, resume=None):
        torch.manual_seed(0)
        model = ftk.apply_lora(_load_4bit(path), "all-linear", r=4, dropout=0.1).train()
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=2, report_to=[],
            save_steps=2, learning_rate=1e-2, seed=0,
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=ds, callbacks=[AdapterCheckpoints()]).train(
            resume_from_checkpoint=resume
        )
        return model

    first = run(4)
    assert (tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors").exists()
    resumed = run(4, resume=str(tmp_path / "out" / "checkpoint-2"))
    mine, theirs = lora_modules(first), lora_modules(resumed)
    assert mine and all(not torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in mine.values())
    for n, m in mine.items():
        torch.testing.assert_close(m.lora_A, theirs[n].lora_A, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=_load_4bit(path), args=TrainingArguments(output_dir=str(tmp_path / "bare"), report_to=[]))


def _torchao_int8(base: nn.Module) -> nn.Module:
    """``base`` with its Linears' weights quantized by torchao (int8 weight-only), in place."""
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torchao.quantize_(base, Int8WeightOnlyConfig())
    return base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dora", [False, True])
def test_torchao_layer_matches_peft(dtype, p, dora):
    """An nn.Linear with a torchao int8 weight: PEFT's TorchaoLoraLinear (a lora.Linear: the sum rounded
    once to the base output's dtype), bit for bit without dropout; with DoRA, to rounding."""
    from peft.tuners.lora.torchao import TorchaoLoraLinear

    base = _torchao_int8(nn.Sequential(nn.Linear(48, 40).to(dtype)))[0]
    assert quant_kind(base) == "torchao"
    ours = LoRAQuantLinear(copy.deepcopy(base), r=4, alpha=8, dropout=p, dora=dora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ("instantiated without get_apply_tensor_subclass")
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=p, use_dora=dora)
        peft = TorchaoLoraLinear(base, "default", config=cfg, r=4, lora_alpha=8)
    peft.float() if dora else None  # (get_peft_model's autocast_adapter_dtype: fp32 adapters and magnitude)
    peft.lora_A.float(), peft.lora_B.float()
    with torch.no_grad():
        ours.lora_B.normal_()
        peft.lora_A["default"].weight.copy_(ours.lora_A)
        peft.lora_B["default"].weight.copy_(ours.lora_B)
        if dora:
            ours.lora_magnitude.mul_(1 + 0.2 * torch.randn_like(ours.lora_magnitude))
            peft.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude)
    x = torch.randn(3, 5, 48).to(dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, seed = seeded(ours, x1)
    if p > 0:
        peft.lora_dropout["default"] = FixedMaskDropout(seed, p)
    yp = peft(x2)
    assert y.dtype == dtype
    if p == 0 and not dora:  # (with dropout, the kernel's x / (1 - p) and the oracle's may differ by an ulp)
        torch.testing.assert_close(y, yp, rtol=0, atol=0)
    tol = 1e-5 if dtype == torch.float32 or not dora else 1e-2  # (DoRA's bf16 W norms: PEFT's in bf16)
    torch.testing.assert_close(y, yp, rtol=tol, atol=tol)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x1, ours.lora_A, ours.lora_B), g)
    want = torch.autograd.grad(yp, (x2, peft.lora_A["default"].weight, peft.lora_B["default"].weight), g)
    for a, b in zip(got, want, strict=True):  # (bf16 DoRA: the two round their grad terms in other places)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def test_torchao_model_from_peft_files_and_no_merge(tmp_path):
    """A model loaded with transformers' TorchAoConfig: from_peft equals PEFT, PEFT's adapter file loads,
    and a merge is refused with nothing changed (requantizing needs the recipe)."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    path = _tiny_llama(tmp_path)

    def load():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(load(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 120, (2, 9))
    want = peft(input_ids=ids).logits
    peft.save_pretrained(str(tmp_path / "peft"))
    ours = ftk.from_peft(peft)
    assert all(m.kind == "torchao" for m in lora_modules(ours).values())
    torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=0, atol=0)
    mine = ftk.load_adapter(load(), str(tmp_path / "peft"))
    torch.testing.assert_close(mine(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(NotImplementedError, match="torchao quantized base weight"):
        ftk.merge_lora(mine)
    assert not any(m.merged for m in lora_modules(mine).values())


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qdora_with_dropout_keeps_no_float_weight(kind):
    """QDoRA with dropout runs D(x) W^T on the dequantized W: ours dequantizes it again in backward, so
    no float copy of W is saved (PEFT's F.linear keeps one per layer until backward)."""
    ours, peft = pair(64, 48, kind, p=0.2, dora=True)
    x = torch.randn(5, 64, requires_grad=True)

    def saved_sizes(layer):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        return sizes

    assert 64 * 48 in saved_sizes(peft)  # (the check sees it where it is kept)
    assert max(saved_sizes(ours)) < 64 * 48


@needs_bnb
def test_compiled_layer_equals_eager():
    """torch.compile traces the adapter path as plain ops (the dropout as the custom op); bitsandbytes'
    ops take care of themselves. Without dropout, the same outputs and adapter grads as eager."""
    ours, _ = pair(64, 48, "nf4")
    x = torch.randn(5, 64, requires_grad=True)
    y = ours(x)
    yc = torch.compile(ours)(x)
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    for a, b in zip(
        torch.autograd.grad(yc, (x, ours.lora_A, ours.lora_B), g),
        torch.autograd.grad(y, (x, ours.lora_A, ours.lora_B), g),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _Doubled(nn.Linear):
    """A Linear whose own forward is not ``x W^T + b`` (the fused kernels would skip it)."""

    def forward(self, x):
        return super().forward(x) * 2


def test_a_linear_with_its_own_forward_runs_itself_as_in_peft(tmp_path):
    """apply_lora over an nn.Linear subclass computing something else: the base runs itself (kind "custom"),
    as PEFT's lora.Linear calls it; equal to PEFT with dropout, adapter files both ways; merge writes the
    float weight (with a warning); a tuple-returning Linear (a router) is still refused."""
    from helpers.lora import compare_with_peft, files_both_ways, fix_dropout, peft_random

    torch.manual_seed(0)
    base = nn.Sequential(_Doubled(16, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    peft = peft_random(base, ["0"], r=3, alpha=6, p=0.25)
    ours = ftk.from_peft(copy.deepcopy(peft))
    assert isinstance(ours[0], LoRAQuantLinear) and ours[0].kind == "custom"
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, ()))
    fix_dropout(peft, seed, 0.25)
    torch.manual_seed(3)
    compare_with_peft(ours, peft, x)
    fresh = ftk.apply_lora(copy.deepcopy(base), ["0"], r=3, alpha=6)
    assert fresh[0].kind == "custom" and fresh[0].lora_A.dtype == torch.float64
    mine = files_both_ways(base, peft_random(base, ["0"], r=3, alpha=6), x, tmp_path)
    with pytest.warns(UserWarning, match="linear in the weight"):
        mine[0].merge()
    torch.testing.assert_close(mine[0](x), mine[0].base(x))

    class Router(nn.Linear):
        def forward(self, x):
            return super().forward(x).softmax(-1).topk(2)

    with pytest.raises(TypeError, match="Router overrides Linear.forward"):
        ftk.apply_lora(nn.Sequential(Router(8, 4)), ["0"], r=2)


def test_torchao_qat_linear_matches_peft():
    """torchao's QAT FakeQuantizedLinear (fake-quantized weight and activations in its forward): PEFT's
    lora.Linear over it, which the fused kernels could not reproduce."""
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    wt = IntxFakeQuantizeConfig(torch.int4, group_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(base, QATConfig(weight_config=wt, step="prepare"))
        peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    ours = ftk.from_peft(copy.deepcopy(peft))
    assert {m.kind for m in lora_modules(ours).values()} == {"custom"}
    x = torch.randn(6, 64)
    torch.testing.assert_close(ours(x), peft(x))
    mine = ftk.apply_lora(copy.deepcopy(base), ["0", "2"], r=4)
    assert all(isinstance(m, LoRAQuantLinear) for m in lora_modules(mine).values())


HQQ = importlib.util.find_spec("hqq") is not None
needs_hqq = pytest.mark.skipif(not HQQ, reason="hqq is not installed")


def _hqq(K, N, dtype=torch.float32, bias=True, seed=0):
    """HQQ's 4-bit HQQLinear quantized from a seeded random nn.Linear (HQQ layers do not deepcopy:
    twins are built again from the seed)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias).to(dtype)
    return HQQLinear(lin, BaseQuantizeConfig(nbits=4, group_size=32), compute_dtype=dtype, device="cpu")


def _hqq_pair(dtype, p=0.0, dora=False, bias=True):
    """(ours, PEFT's HqqLoraLinear) over twin HQQ layers, the same random A, B (and magnitude)."""
    from peft.tuners.lora.hqq import HqqLoraLinear

    base = _hqq(48, 40, dtype, bias)
    assert quant_kind(base) == "hqq"
    ours = LoRAQuantLinear(base, r=4, alpha=8, dropout=p, dora=dora)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=p, use_dora=dora)
    peft = HqqLoraLinear(_hqq(48, 40, dtype, bias), "default", config=cfg, r=4, lora_alpha=8).float()
    _share_adapters(ours, peft, dora)
    return ours, peft


@needs_hqq
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dora", [False, True])
def test_hqq_layer_matches_peft(dtype, p, dora):
    """HQQ's HQQLinear (compute dtype fp32 / bf16): PEFT's HqqLoraLinear (the sum rounded once to the base
    output's dtype), outputs and the grads of x, A, B (and the magnitude); the base stays frozen."""
    ours, peft = _hqq_pair(dtype, p, dora)
    y = _compare_layers(ours, peft, torch.randn(3, 5, 48).to(dtype), p, dora, 1e-5 if dtype == torch.float32 else 1e-2)
    assert y.dtype == dtype
    assert not any(q.requires_grad for q in ours.base.parameters())


@needs_hqq
@pytest.mark.parametrize("dora", [False, True])
def test_hqq_merge_requantizes_and_keeps_the_bias(dora):
    """Merging dequantizes, adds s B A (DoRA: PEFT's merged weight) and quantizes again with the layer's
    own config into a new HQQLinear that keeps the bias (PEFT's HQQ merge drops it: its merged outputs
    are off by the bias); unmerging goes back to rounding."""
    ours, peft = _hqq_pair(torch.float32, dora=dora)
    with torch.no_grad():
        ours.base.bias.add_(3.0)
    x = torch.randn(6, 48)
    unmerged = ours(x)
    old = ours.base
    with pytest.warns(UserWarning, match="quantized again"):
        ours.merge()
    assert ours.merged and ours.base is not old and quant_kind(ours.base) == "hqq"
    assert ours.base.bias is old.bias and ours.base.quant_config == old.quant_config
    # 4-bit rounding of W + s B A only (a dropped bias would be 3 off, 0.3 of the max)
    assert (ours(x) - unmerged).abs().max() <= 0.15 * unmerged.abs().max()
    with pytest.warns(UserWarning, match="quantized again"):
        ours.unmerge()
    assert (ours(x) - unmerged).abs().max() <= 0.15 * unmerged.abs().max()


@needs_hqq
def test_hqq_model_apply_lora_from_peft_and_files_both_ways(tmp_path):
    """A model of HQQ layers: apply_lora targets them (LoRAQuantLinear), and its adapter file loads into
    PEFT with the same outputs; PEFT's model converts with from_peft, and its file loads into ours."""

    def model():
        return nn.Sequential(_hqq(48, 40, seed=1), nn.Tanh(), _hqq(40, 24, bias=False, seed=2))

    x = torch.randn(4, 48)
    ours = ftk.apply_lora(model(), ["0", "2"], r=4, alpha=8)
    assert [type(ours[i]).__name__ for i in (0, 2)] == ["LoRAQuantLinear"] * 2 and ours[0].kind == "hqq"
    with torch.no_grad():
        ours[0].lora_B.normal_(), ours[2].lora_B.normal_()
    ftk.save_adapter(ours, str(tmp_path / "ours"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(model(), str(tmp_path / "ours"))
    torch.testing.assert_close(loaded(x), ours(x))
    loaded.save_pretrained(str(tmp_path / "peft"))
    mine = ftk.load_adapter(model(), str(tmp_path / "peft"))
    torch.testing.assert_close(mine(x), loaded(x))
    fused = ftk.from_peft(loaded)
    assert isinstance(fused[2], LoRAQuantLinear) and fused[2].kind == "hqq"
    torch.testing.assert_close(fused(x), ours(x))


@needs_hqq
def test_hqq_llama_from_peft_and_trainer(tmp_path):
    """A Llama quantized by hqq's AutoHQQHFModel: PEFT's LoRA on it converts with from_peft (the same
    logits and grads), and apply_lora's model trains under Trainer (B leaves zero)."""
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    path = _tiny_llama(tmp_path)

    def load():
        model = AutoModelForCausalLM.from_pretrained(path)
        cfg = BaseQuantizeConfig(nbits=4, group_size=64)
        AutoHQQHFModel.quantize_model(model, quant_config=cfg, compute_dtype=torch.float32, device="cpu")
        return model

    targets = ["q_proj", "v_proj", "down_proj"]
    peft = _trained_b(get_peft_model(load(), LoraConfig(r=4, lora_alpha=8, target_modules=targets)))
    twin = get_peft_model(load(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    twin.load_state_dict({k: v for k, v in peft.state_dict().items() if "lora_" in k}, strict=False)
    fused = ftk.from_peft(twin)
    assert isinstance(fused.model.layers[0].mlp.down_proj, LoRAQuantLinear)
    ids = torch.randint(0, 120, (2, 9))
    y, yp = fused(input_ids=ids).logits, peft(input_ids=ids).logits
    torch.testing.assert_close(y, yp)
    g = torch.randn_like(y)
    y.backward(g)
    yp.backward(g)
    theirs = peft.base_model.model.model.layers[1].self_attn.v_proj.lora_A["default"].weight.grad
    torch.testing.assert_close(fused.model.layers[1].self_attn.v_proj.lora_A.grad, theirs)
    model = ftk.apply_lora(load(), targets, r=4, dropout=0.1).train()
    ds = [{"input_ids": torch.randint(0, 120, (8,)), "labels": torch.randint(0, 120, (8,))} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, report_to=[])
    Trainer(model=model, args=args, train_dataset=ds).train()
    assert all(torch.count_nonzero(m.lora_B) > 0 for m in lora_modules(model).values())


def _trained_b(peft_model):
    """PEFT's B moved off zero (so A's gradients and the adapter's outputs show)."""
    with torch.no_grad():
        for n, q in peft_model.named_parameters():
            if "lora_B" in n:
                q.normal_(std=0.1)
    return peft_model
