"""Test helpers shared by the LoRA layer tests."""

import copy
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ftkernels.nn.reference import lora_keep_mask


class FixedMaskDropout(nn.Module):
    """PEFT's dropout slot filled with our stream's mask for one seed (rows of x's logical
    ``[numel / K, K]`` view), so PEFT sees the same D(x) as the fused layers. Ignores eval mode."""

    def __init__(self, seed, p):
        super().__init__()
        self.seed, self.p = seed, p

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        keep = lora_keep_mask(self.seed, x2.shape[0], x2.shape[1], self.p).to(x.device)
        return (x2 * keep.to(x.dtype) / (1 - self.p)).reshape(x.shape)


def lora_nodes(fn) -> list[int]:
    """The LoRA autograd nodes of the graph behind ``fn`` (a grad_fn), as their member counts (1 for a
    single layer, G for a shared-input group), sorted; C++ node and Python Functions alike."""
    seen, stack, sizes = set(), [fn], []
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        name = f.name()
        if "LoRALinearNode" in name or name in ("LoRALinearFunctionBackward", "LoRAGroupFunctionBackward"):
            sizes.append(len(f._input_metadata))
        stack.extend(n for n, _ in f.next_functions)
    return sorted(sizes)


def lora_members(K, shapes, dtype, device="cpu", adapter_dtype=None, base_grad=False, bias=(True,)):
    """Random ``(weight [N, K], bias [N] or None, lora_a [r, K], lora_b [N, r], seed)`` per ``(N, r)`` in
    ``shapes``, as ``lora_group_ys`` takes them; member i has a bias when ``bias[i % len(bias)]``.
    Adapters in ``adapter_dtype`` (default: ``dtype``) and trainable; the base trains with ``base_grad``."""
    out = []
    for i, (N, r) in enumerate(shapes):
        ad = adapter_dtype or dtype
        w = (torch.randn(N, K, dtype=dtype, device=device) / K**0.5).requires_grad_(base_grad)
        b = torch.randn(N, dtype=dtype, device=device).requires_grad_(base_grad) if bias[i % len(bias)] else None
        a = torch.randn(r, K, dtype=ad, device=device, requires_grad=True)
        bb = torch.randn(N, r, dtype=ad, device=device, requires_grad=True)
        out.append((w, b, a, bb, torch.tensor(1000 + 17 * i, device=device)))
    return out


def paired_conv_inputs(ours, peft, shape, channels_last=False, dtype=torch.float64):
    """Two equal random inputs (requiring grad) for a fused LoRA conv and its PEFT twin, with both
    base biases made trainable, so one backward compares every gradient."""
    ours.base.bias.requires_grad_(True)
    peft.base_layer.bias.requires_grad_(True)
    x = torch.randn(*shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.clone().requires_grad_(True), x.clone().requires_grad_(True)


def peft_random(base, targets, r=3, alpha=6, p=0.0, **kw):
    """PEFT LoRA (``LoraConfig`` extras in kw, e.g. ``use_dora=True``) over a copy of ``base`` with random B
    and, for DoRA, magnitudes off the row norms (so neither is at its identity init)."""
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=targets, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "groups > 1. Merging is not supported."
        peft = get_peft_model(copy.deepcopy(base), cfg, autocast_adapter_dtype=False)
    with torch.no_grad():
        for n, q in peft.named_parameters():
            if "lora_B" in n:
                q.normal_(std=0.5)
            elif "magnitude" in n:
                q.mul_(1 + 0.2 * torch.randn_like(q))
    return peft


def fix_dropout(peft, seed, p):
    """PEFT's dropout slots filled with our stream's mask for ``seed`` (both then see the same D(x))."""
    for m in peft.modules():
        if hasattr(m, "lora_dropout") and "default" in getattr(m, "lora_dropout", {}):
            m.lora_dropout["default"] = FixedMaskDropout(seed, p)


def trainable(model):
    """Trainable parameters by a name a fused model and its PEFT twin share (PEFT's prefixes and
    adapter keys stripped, its magnitude, LoRA bias and base names mapped to ours)."""
    out = {}
    for n, q in model.named_parameters():
        if q.requires_grad:
            n = n.removeprefix("base_model.model.").replace(".default.weight", "").replace(".default", "")
            n = n.replace("lora_magnitude_vector", "lora_magnitude").replace("lora_B.bias", "lora_bias")
            out[n.replace("base_layer.", "base.")] = q
    return out


def check_low_precision(layer, x, dtype, tol):
    """A float64 LoRA conv layer run again with its base in ``dtype`` and fp32 adapters on x: the output
    in ``dtype`` and the adapters' fp32 grads within ``tol`` (relative to each tensor's max) of the
    float64 results. Changes the layer's dtypes."""
    want = layer(x)
    g = torch.randn_like(want)
    ra, rb = torch.autograd.grad(want, (layer.lora_A, layer.lora_B), g)
    layer.base.to(dtype)
    layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), layer.lora_B.data.float()
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    ga, gb = torch.autograd.grad(y, (layer.lora_A, layer.lora_B), g.to(dtype))
    assert ga.dtype == gb.dtype == torch.float32
    for got, ref in ((y, want), (ga, ra), (gb, rb)):
        assert (got.double() - ref).abs().max() <= tol * ref.abs().max()


def files_both_ways(base, peft, x, tmp_path):
    """PEFT's saved adapter loads into a copy of ``base`` (ftk.load_adapter) with PEFT's outputs on x,
    and ftk.save_adapter's file loads back into PEFT with them too. Returns the loaded fused model."""
    import ftkernels as ftk

    peft.save_pretrained(str(tmp_path / "peft"))
    mine = ftk.load_adapter(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(mine(x), peft(x))
    ftk.save_adapter(mine, str(tmp_path / "ours"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(back(x), peft(x))
    return mine


def compare_with_peft(ours, peft, x, tol=1e-10):
    """One forward and backward of a fused model and its PEFT twin on x (float64): outputs, grad_x and
    every trainable parameter's grad agree to ``tol`` (relative; absolute 1e-2 * tol)."""
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, yp = ours(x1), peft(x2)
    close = dict(rtol=tol, atol=tol * 1e-2)
    torch.testing.assert_close(y, yp, **close)
    g = torch.randn_like(y)
    y.backward(g)
    yp.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **close)
    mine, theirs = trainable(ours), trainable(peft)
    assert set(mine) == set(theirs) and mine
    for n, q in mine.items():
        torch.testing.assert_close(q.grad, theirs[n].grad, rtol=tol, atol=tol * 0.1, msg=n)


def quantized(K, N, kind, bias=True, compute=torch.float32):
    """A bitsandbytes layer quantized from a random nn.Linear (``kind``: nf4 / fp4 4-bit, or int8)."""
    import bitsandbytes as bnb

    lin = nn.Linear(K, N, bias=bias)
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(K, N, bias=bias, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=compute, quant_type=kind)
    q.load_state_dict(lin.state_dict())
    return q.to("cpu")  # (moving quantizes)
