"""Test helpers shared by the LoRA layer tests."""

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
