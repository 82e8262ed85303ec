"""Optimizer-step benchmark: FusedAdamW vs torch.optim.AdamW(fused=True) and vs the eager
composition of the same regularizers, on GPT-2-like parameter shapes.

Minimal bytes per element of e bytes (the floor is bytes / measured copy bandwidth):
  plain AdamW: read p, g, m, v + write p, m, v = 7e (fp32: 28 B; bf16/fp16 params and state, fp32
  math, as torch's fused AdamW does: 14 B)
  all options: + read anchor (e), mask bits (1/8 B), and g once more for the global norm = 9e + 1/8
  (fp32: 36.125 B)
Rows: plain fp32, plain bf16 and all-options fp32; with ``--dtype``, plain and all options in that dtype.
"""

from __future__ import annotations

import torch

from ..masks import set_grad_mask
from ..optim import FusedAdamW
from .common import peak_extra_mb, short_dtype, time_pair_ms

ALL_OPTIONS = dict(grad_dropout=0.1, l1=1e-6, l2sp=1e-3, max_grad_norm=1.0)


def bytes_plain(dtype: torch.dtype) -> float:
    """Floor bytes per element of a plain AdamW step (see the module doc)."""
    return 7.0 * dtype.itemsize


def bytes_all(dtype: torch.dtype) -> float:
    """Floor bytes per element of an all-options step (see the module doc)."""
    return 9.0 * dtype.itemsize + 0.125


def gpt2_like_shapes(hidden: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style decoder (token + position embeddings, per block: ln, qkv,
    attn proj, ln, mlp up/down, with biases; final ln)."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden), (1024, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,), (3 * hidden, hidden), (3 * hidden,), (hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,), (4 * hidden, hidden), (4 * hidden,), (hidden, 4 * hidden), (hidden,)]
    shapes += [(hidden,), (hidden,)]
    return shapes


def default_sizes(device: torch.device, quick: bool) -> dict:
    """GPT-2-like parameter shapes for the suite: ~180M params on a GPU, ~10M on CPU, less with ``quick``."""
    if device.type == "cuda":  # ~180M params: hidden 1024, 10 blocks, 50257 vocab
        return dict(hidden=1024, layers=10, vocab=50257)
    if quick:
        return dict(hidden=128, layers=2, vocab=2048)
    return dict(hidden=384, layers=4, vocab=8192)  # ~10M params: a few seconds per case on 2 cores


def _make(shapes, device, seed=0, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(device, dtype)
    return params


class EagerRegularizedAdamW:
    """The same semantics as FusedAdamW(**ALL_OPTIONS) with an element mask, in torch ops around
    torch's fused AdamW: what a user writes without ftkernels."""

    def __init__(self, params, masks, lr, p_drop, l1, l2sp, max_norm, fused):
        self.params, self.masks = params, masks
        self.anchors = [p.detach().clone() for p in params]
        self.opt = torch.optim.AdamW(params, lr=lr, fused=fused)
        self.lr, self.p, self.l1, self.l2sp, self.max_norm = lr, p_drop, l1, l2sp, max_norm

    @torch.no_grad()
    def step(self):
        """Clip, drop out, add L1 and L2-SP in torch ops, then torch's AdamW, then restore masked-out elements."""
        grads = [p.grad for p in self.params]
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        for p, g, a in zip(self.params, grads, self.anchors):
            keep = torch.rand_like(g) >= self.p
            g.mul_(keep).div_(1 - self.p)
            g.add_(p - a, alpha=self.l2sp)
        frozen = [(p.clone(), {k: v.clone() for k, v in self.opt.state[p].items() if v.dim()}) for p in self.params]
        self.opt.step()
        for p, m, (p0, st0) in zip(self.params, self.masks, frozen):
            p.copy_(p.sign() * (p.abs() - self.lr * self.l1).clamp_min(0))
            p.copy_(torch.where(m, p, p0))
            for k, v in st0.items():
                self.opt.state[p][k].copy_(torch.where(m, self.opt.state[p][k], v))


def run(
    device: torch.device, quick: bool, ceilings: dict, dtype: torch.dtype | None = None, sizes: dict | None = None
) -> tuple[list[dict], dict]:
    """Rows for the plain and the all-options AdamW step (see the module doc for the floors);
    ``ceilings`` as measured by ``runner.measure_ceilings``; ``dtype``: params and state (``--dtype``)."""
    sizes = sizes or default_sizes(device, quick)
    shapes = gpt2_like_shapes(**sizes)
    numel = sum(torch.Size(s).numel() for s in shapes)
    reps = 5 if quick else (20 if device.type == "cuda" else 7)
    bw = ceilings["copy_GBps"] * 1e9
    lr = 1e-4
    rows = []

    def add(case, baseline_name, base_ms, ours_ms, nbytes, base_fn, ours_fn):
        rows.append(
            dict(
                case=case,
                baseline=baseline_name,
                baseline_ms=base_ms,
                ours_ms=ours_ms,
                floor_ms=numel * nbytes / bw * 1e3,
                ours_GBps=numel * nbytes / (ours_ms * 1e-3) / 1e9,
                baseline_mem_MB=peak_extra_mb(base_fn, device),
                ours_mem_MB=peak_extra_mb(ours_fn, device),
            )
        )

    has_fused = device.type in ("cuda", "cpu")
    # plain AdamW (state in the params' dtype on both sides)
    for dt in (torch.float32, torch.bfloat16) if dtype is None else (dtype,):
        pa, pb = _make(shapes, device, dtype=dt), _make(shapes, device, dtype=dt)
        ours = FusedAdamW(pa, lr=lr)
        base = torch.optim.AdamW(pb, lr=lr, fused=has_fused)
        t_ours, t_base = time_pair_ms(ours.step, base.step, device, reps=reps)
        name = f"adamw {short_dtype(dt)}, no options"
        add(name, "torch AdamW(fused=True)", t_base, t_ours, bytes_plain(dt), base.step, ours.step)
        del pa, pb, ours, base

    # all options on (50% element mask on every matrix)
    dt = dtype or torch.float32
    pa, pb = _make(shapes, device, dtype=dt), _make(shapes, device, dtype=dt)
    masks = []
    g = torch.Generator(device="cpu").manual_seed(1)
    for p in pa:
        m = (torch.rand(p.shape, generator=g) > 0.5).to(device)
        set_grad_mask(p, m)
        masks.append(m)
    ours = FusedAdamW(pa, lr=lr, **ALL_OPTIONS)
    eager = EagerRegularizedAdamW(
        pb,
        masks,
        lr,
        ALL_OPTIONS["grad_dropout"],
        ALL_OPTIONS["l1"],
        ALL_OPTIONS["l2sp"],
        ALL_OPTIONS["max_grad_norm"],
        fused=has_fused,
    )
    t_ours, t_eager = time_pair_ms(ours.step, eager.step, device, rounds=3, reps=max(3, reps // 2))
    add(
        f"adamw {short_dtype(dt)}, mask+dropout+L1+L2-SP+clip",
        "eager torch ops + AdamW(fused=True)",
        t_eager,
        t_ours,
        bytes_all(dt),
        eager.step,
        ours.step,
    )
    env = dict(numel=numel, copy_GBps=bw / 1e9, sizes=sizes)
    return rows, env
