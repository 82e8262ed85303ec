"""No host synchronization inside a training step of our layers and optimizers (GPU only).

An eager step on a fast GPU is bound by the host (bench/NOTES.md, session 5). A sync inside it would
make the host wait for the device on every call, and a CUDA graph capture of the step would fail.
After warm-up calls (per-shape route timing and Triton autotuning sync once, by design), a step runs
under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronizing CUDA call.
"""

import pytest
import torch
from torch import nn

import ftkernels as ftk

pytestmark = pytest.mark.cuda


def _no_sync(step, warmup: int = 2) -> None:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def _train_step(model, x, opt):
    def step():
        opt.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
        opt.step()

    return step


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_mlp_step(p):
    """LoRA Linear layers (three siblings on one input: a shared-input group), dropout on and off,
    bf16, with FusedAdamW."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(128, 128) for _ in range(3))
            self.o = nn.Linear(128, 96)

        def forward(self, x):
            return self.o(self.q(x) * self.k(x) + self.v(x))

    model = Block().to("cuda", torch.bfloat16)
    ftk.apply_lora(model, ["q", "k", "v", "o"], r=8, dropout=p)
    x = torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16)
    opt = ftk.optim.FusedAdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    _no_sync(_train_step(model, x, opt))


def test_masked_linear_step():
    """MaskedLinear (rows mode, whichever route was picked) with a masked FusedAdamW step."""
    lin = nn.Linear(256, 192, device="cuda", dtype=torch.bfloat16)
    model = ftk.nn.MaskedLinear.from_linear(lin, ftk.masks.rows(lin.weight, keep=0.1, by="random"))
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    opt = ftk.optim.FusedAdamW(model.parameters(), lr=1e-3)
    _no_sync(_train_step(model, x, opt))


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_loreft_step(p):
    """LoReFT on bf16 hidden states: the fused op and the orthonormal parametrization's QR."""
    model = ftk.nn.LoReFT(256, 4, dropout=p, device="cuda")
    x = torch.randn(8, 32, 256, device="cuda", dtype=torch.bfloat16)
    opt = ftk.optim.FusedAdamW(model.parameters(), lr=1e-3)
    _no_sync(_train_step(model, x, opt))
