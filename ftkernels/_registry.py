"""Which backend serves each op, per device. One entry per op; build_info() resolves it."""

from __future__ import annotations

# op name -> {device type: backend kind}. Kinds: "c++" / "cuda" (ftkernels._C), "triton".
OPS: dict[str, dict[str, str]] = {
    "fused_optim_step": {"cpu": "c++", "cuda": "cuda"},
    "lora_linear": {"cpu": "c++", "cuda": "triton"},
    "lora_dropout": {"cpu": "c++", "cuda": "triton"},
    "lora_mask_apply": {"cpu": "c++", "cuda": "cuda"},  # the C++ LoRA node's dropout (eager CUDA calls)
    "loreft": {"cpu": "c++", "cuda": "triton"},
}
