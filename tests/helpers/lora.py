"""Test helpers shared by the LoRA layer tests."""

import torch
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
