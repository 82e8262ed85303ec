"""LoRA Linear benchmark: one training step's layer work (forward + backward with grad_x) of
``ftk.nn.LoRALinear`` against, side by side on the same inputs:

- the frozen base ``nn.Linear`` alone (forward + grad_x): the floor any LoRA layer sits on;
- PEFT's ``lora.Linear`` in eager mode (and under ``torch.compile`` on GPU);
- the best known hand-written technique (cuBLAS matmuls, ``addmm_`` into y and grad_x, a
  hand-written backward; dropout 0 only);
- DoRA (``dora=True``) against PEFT's ``use_dora=True`` layer, and a LoRA bias (``lora_bias=True``)
  against PEFT's ``lora_bias=True`` layer, on the headline shape;
- LoRA on an ``nn.MultiheadAttention`` (ViT-B's self-attention on GPU) against PEFT's
  ``lora.MultiheadAttention`` and the frozen layer.

Memory: peak allocation of the step on GPU; on every device, the MB autograd saves for backward.
Inputs: each case cycles through enough x/g sets to stream twice the last-level cache between uses of
one (``common.input_sets``), so small cases do not run from cache as a layer in a network would not.

Physical floor of a case: (base + rank-r flops) / measured matmul rate; the LoRA flops
(``6 M r (K + N)``) are ~2% of the base's (``4 M N K``) at r=16, K=N=4096.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..nn import LoRALinear
from .common import compile_baselines, dtype_name, layer_step, peak_extra_mb, step_inputs, time_rounds_ms


class HandWrittenLoRA(torch.autograd.Function):
    """Dropout-free LoRA with cuBLAS matmuls and in-place ``addmm_``: the strongest known unfused
    baseline. Saves x and u = x A^T only."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        u = x @ lora_a.t()
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        y.addmm_(u, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, u)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, lora_a, lora_b, u = ctx.saved_tensors
        s = ctx.scaling
        grad_b = (g.t() @ u).mul_(s)
        v = (g @ lora_b).mul_(s)
        grad_a = v.t() @ x
        grad_x = (g @ weight).addmm_(v, lora_a)
        return grad_x, None, None, grad_a, grad_b, None


class HandWrittenModule(nn.Module):
    def __init__(self, layer: LoRALinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        L = self.layer
        x2 = x.reshape(-1, x.shape[-1])
        a, b = L.lora_A.to(x.dtype), L.lora_B.to(x.dtype)
        y = HandWrittenLoRA.apply(x2, L.base.weight, L.base.bias, a, b, L.scaling)
        return y.view(*x.shape[:-1], -1)


def _peft_layer(base: nn.Linear, r: int, alpha: float, p: float, ours: LoRALinear):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, use_dora=ours.dora, lora_bias=ours.has_lora_bias)
    layer = PeftLinear(base, "default", config=cfg, r=r, lora_alpha=alpha)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
        if ours.dora:
            layer.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude)
        if ours.has_lora_bias:
            layer.lora_B["default"].bias.copy_(ours.lora_bias)
    return layer


def cases(device: torch.device, quick: bool, dtype: torch.dtype | None = None) -> list[dict]:
    """(M, K, N, r, p, dtype, sweep) per case; the headline shape first. ``dtype`` replaces each case's own
    (bf16 on GPU, fp32 on CPU)."""
    own = _cases(device, quick)
    return own if dtype is None else [{**c, "dtype": dtype} for c in own]


def _cases(device: torch.device, quick: bool) -> list[dict]:
    if device.type == "cuda":
        head = [dict(M=8192, K=4096, N=4096, r=16, p=p, dtype=torch.bfloat16, sweep=False) for p in (0.1, 0.0)]
        if quick:
            return head
        sweep = [dict(M=8192, K=4096, N=4096, r=r, p=0.1, dtype=torch.bfloat16, sweep=True) for r in (8, 32, 64, 128)]
        sweep += [dict(M=m, K=4096, N=4096, r=16, p=0.1, dtype=torch.bfloat16, sweep=True) for m in (512, 2048, 16384)]
        sweep += [  # Llama-7B MLP projections: up/gate 4096 -> 11008, down 11008 -> 4096
            dict(M=8192, K=4096, N=11008, r=16, p=0.1, dtype=torch.bfloat16, sweep=True),
            dict(M=8192, K=11008, N=4096, r=16, p=0.1, dtype=torch.bfloat16, sweep=True),
        ]
        return head + sweep
    size = dict(M=512, K=512, N=512) if quick else dict(M=2048, K=1024, N=1024)
    return [dict(**size, r=16, p=p, dtype=torch.float32, sweep=False) for p in (0.1, 0.0)]


def saved_mb(layer, x) -> float:
    """MB autograd keeps for backward after one forward (distinct storages, parameters excluded):
    the activation memory a layer holds during a training step, on any device. x counts when a
    layer keeps it (a frozen base layer does not; in a network x is usually alive anyway)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    params = {q.untyped_storage().data_ptr() for q in layer.parameters()}
    del y
    return sum(n for ptr, n in seen.items() if ptr not in params) / 2**20


def run(device: torch.device, quick: bool, ceilings: dict, dtype: torch.dtype | None = None) -> tuple[list[dict], dict]:
    """Rows per case and baseline; ``ours_vs_base`` = ours / frozen base layer (target <= 1.10 on GPU).
    The op's GEMM route is chosen by timing (``FTKERNELS_LORA_GEMM=auto``) unless the caller set one,
    so this suite keeps reporting which route wins per shape."""
    prev = os.environ.get("FTKERNELS_LORA_GEMM")
    os.environ.setdefault("FTKERNELS_LORA_GEMM", "auto")
    try:
        return _run(device, quick, ceilings, dtype)
    finally:
        if prev is None:
            os.environ.pop("FTKERNELS_LORA_GEMM", None)


def _run(device: torch.device, quick: bool, ceilings: dict, dtype: torch.dtype | None) -> tuple[list[dict], dict]:
    rows = []
    rate = ceilings["matmul_TFLOPs"] * 1e12
    reps = 5 if quick else 20
    for c in cases(device, quick, dtype):
        M, K, N, r, p, dtype = c["M"], c["K"], c["N"], c["r"], c["p"], c["dtype"]
        torch.manual_seed(0)
        base = nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)
        ours = LoRALinear(base, r=r, alpha=2 * r, dropout=p).to(dtype=dtype)
        with torch.no_grad():
            ours.lora_B.normal_(std=1e-3)
        peft_base = nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)
        peft_base.load_state_dict(base.state_dict())
        peft = _peft_layer(peft_base, r, 2 * r, p, ours).to(dtype=dtype)
        x, g = step_inputs((M, K), (M, N), device, dtype)
        layers = {"frozen base layer (floor)": base, "PEFT eager": peft}
        fns = {"frozen base layer (floor)": layer_step(base, x, g), "PEFT eager": layer_step(peft, x, g)}
        if compile_baselines(device) and not c["sweep"]:
            fns["PEFT + torch.compile"] = layer_step(torch.compile(peft), x, g)
        if p == 0.0:
            layers["hand-written cuBLAS + addmm_"] = HandWrittenModule(ours)
            fns["hand-written cuBLAS + addmm_"] = layer_step(layers["hand-written cuBLAS + addmm_"], x, g)
        layers["ours"] = ours
        fns["ours"] = layer_step(ours, x, g)
        saved = {k: saved_mb(m, x[0]) for k, m in layers.items()}
        ms = time_rounds_ms(fns, device, reps, rounds=3 if quick else 4, warmup=2)
        mem = {k: peak_extra_mb(fn, device) for k, fn in fns.items()}
        flops = 4 * M * N * K + 6 * M * r * (K + N)
        floor = flops / rate * 1e3
        name = f"M{M} K{K} N{N} r{r} p{p} {dtype_name(dtype)}"
        rows += _rows(name, ms, mem, saved, floor, "frozen base layer (floor)", c["sweep"])
        del base, ours, peft, peft_base, x, g, fns
    rows += _trio_rows(device, quick, rate, reps, dtype)
    rows += _variant_rows(device, quick, rate, reps, dtype, "DoRA")
    rows += _variant_rows(device, quick, rate, reps, dtype, "LoRA bias")
    rows += _mha_rows(device, quick, rate, reps, dtype)
    extra = {}
    if device.type == "cuda":  # which GEMM route the op picked per shape (FTKERNELS_LORA_GEMM=auto here)
        from ..triton import lora_linear as tk

        extra["gemm_choices"] = {" ".join(map(str, k)): v for k, v in tk.chosen().items()}
    return rows, extra


class Trio(nn.Module):
    """Three projections of one x (attention's q/k/v), their outputs summed so one tensor carries
    the step's gradient."""

    def __init__(self, K: int, N: int, device, dtype):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(K, N, device=device, dtype=dtype) for _ in range(3))

    def forward(self, x):
        return self.q(x) + self.k(x) + self.v(x)


def _trio_rows(device: torch.device, quick: bool, rate: float, reps: int, dtype: torch.dtype | None) -> list[dict]:
    """q/k/v of one x at BERT-base width: ours grouped (one autograd node, one grad_x buffer; see
    ftkernels/nn/lora_group.py) against ours with each layer alone and against PEFT, side by side.
    At this size a step is host-bound on a GPU, which is what grouping addresses."""
    import copy

    from peft import LoraConfig, get_peft_model

    from ..nn.lora_group import ungroup
    from ..peft_compat import apply_lora

    if device.type == "cuda":
        M, K, r, p, own = 4096, 768, 16, 0.1, torch.bfloat16  # BERT-base: batch 32 x 128 tokens
    else:
        M, K, r, p, own = (64, 128, 16, 0.1, torch.float32) if quick else (256, 256, 16, 0.1, torch.float32)
    dtype = dtype or own
    torch.manual_seed(0)
    base = Trio(K, K, device, dtype).requires_grad_(False)
    ours = apply_lora(copy.deepcopy(base), ["q", "k", "v"], r=r, alpha=2 * r, dropout=p)
    alone = copy.deepcopy(ours)
    ungroup(alone)
    peft = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["q", "k", "v"])
    )
    x, g = step_inputs((M, K), (M, K), device, dtype)
    models = {"frozen q/k/v (floor)": base, "PEFT eager": peft, "ours, each layer alone": alone, "ours": ours}
    fns = {k: layer_step(m, x, g) for k, m in models.items()}
    ms = time_rounds_ms(fns, device, reps, rounds=4, warmup=3)  # warm-up also lets the groups learn
    mem = {k: peak_extra_mb(fn, device) for k, fn in fns.items()}
    saved = {k: saved_mb(m, x[0]) for k, m in models.items()}
    floor = 3 * (4 * M * K * K + 6 * M * r * 2 * K) / rate * 1e3
    name = f"q/k/v of one x: M{M} K=N={K} r{r} p{p} {dtype_name(dtype)}"
    return _rows(name, ms, mem, saved, floor, "frozen q/k/v (floor)", False)


def _variant_rows(
    device: torch.device, quick: bool, rate: float, reps: int, dtype: torch.dtype | None, variant: str
) -> list[dict]:
    """A LoRA variant against PEFT's layer of that variant and the frozen base, the headline shape without
    and with dropout: ``"DoRA"`` (``dora=True`` / ``use_dora=True``) or ``"LoRA bias"`` (``lora_bias=True``,
    both). Floor as LoRA's (DoRA's row norms add one pass over W and a rank-r GEMM of W, ~0.4% of the
    flops at r=16, K=N=4096; a LoRA bias adds an [N] add and the bias gradient's reduction of g)."""
    flag = {"DoRA": "dora", "LoRA bias": "lora_bias"}[variant]
    rows = []
    for c in [c for c in cases(device, quick, dtype) if not c["sweep"]][:2]:
        M, K, N, r, p, dt = c["M"], c["K"], c["N"], c["r"], c["p"], c["dtype"]
        torch.manual_seed(0)
        base = nn.Linear(K, N, device=device, dtype=dt).requires_grad_(False)
        ours = LoRALinear(base, r=r, alpha=2 * r, dropout=p, **{flag: True})
        with torch.no_grad():
            ours.lora_B.normal_(std=1e-3)
            if ours.has_lora_bias:
                ours.lora_bias.normal_(std=1e-3)
        peft_base = nn.Linear(K, N, device=device, dtype=dt).requires_grad_(False)
        peft_base.load_state_dict(base.state_dict())
        peft = _peft_layer(peft_base, r, 2 * r, p, ours)
        x, g = step_inputs((M, K), (M, N), device, dt)
        layers = {"frozen base layer (floor)": base, f"PEFT eager ({variant})": peft, "ours": ours}
        fns = {k: layer_step(m, x, g) for k, m in layers.items()}
        saved = {k: saved_mb(m, x[0]) for k, m in layers.items()}
        ms = time_rounds_ms(fns, device, reps, rounds=3 if quick else 4, warmup=2)
        mem = {k: peak_extra_mb(fn, device) for k, fn in fns.items()}
        floor = (4 * M * N * K + 6 * M * r * (K + N)) / rate * 1e3
        name = f"{variant} M{M} K{K} N{N} r{r} p{p} {dtype_name(dt)}"
        rows += _rows(name, ms, mem, saved, floor, "frozen base layer (floor)", False)
    return rows


class SelfAttention(nn.Module):
    """``mha(x, x, x)`` as one-input layer (torchvision's ViT block calls it so)."""

    def __init__(self, mha: nn.Module):
        super().__init__()
        self.attn = mha

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _mha_rows(device: torch.device, quick: bool, rate: float, reps: int, dtype: torch.dtype | None) -> list[dict]:
    """LoRA on nn.MultiheadAttention (q/k/v packed, and out_proj): ours against PEFT's
    ``lora.MultiheadAttention`` (which folds both adapters into the weights around every call and pays
    their dense weight gradients) and the frozen layer. Floor: the frozen layer's projection flops,
    forward and grad_x (``16 M E^2``), attention's (``4 N L^2 E`` forward, about twice that backward)
    and the adapters' (``30 M r E``), over the matmul rate."""
    import copy

    from peft import LoraConfig, get_peft_model

    from ..peft_compat import apply_lora

    if device.type == "cuda":
        N, L, E, H, r, own = 32, 197, 768, 12, 16, torch.bfloat16  # ViT-B/16 at 224 px, batch 32
    else:
        N, L, E, H, r, own = (2, 33, 64, 4, 8, torch.float32) if quick else (4, 197, 384, 6, 16, torch.float32)
    dtype = dtype or own
    torch.manual_seed(0)
    base = SelfAttention(nn.MultiheadAttention(E, H, batch_first=True, device=device, dtype=dtype))
    base.requires_grad_(False)
    ours = apply_lora(copy.deepcopy(base), ["attn"], r=r, alpha=2 * r)
    with torch.no_grad():
        ours.attn.lora_B.normal_(std=1e-3)
        ours.attn.out_lora_B.normal_(std=1e-3)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["attn"])
    peft = get_peft_model(copy.deepcopy(base), cfg)
    x, g = step_inputs((N, L, E), (N, L, E), device, dtype)
    models = {"frozen MHA (floor)": base, "PEFT eager": peft, "ours": ours}
    fns = {k: layer_step(m, x, g) for k, m in models.items()}
    ms = time_rounds_ms(fns, device, reps, rounds=3 if quick else 4, warmup=2)
    mem = {k: peak_extra_mb(fn, device) for k, fn in fns.items()}
    saved = {k: saved_mb(m, x[0]) for k, m in models.items()}
    M = N * L
    floor = (16 * M * E * E + 12 * N * L * L * E + 30 * M * r * E) / rate * 1e3
    name = f"MultiheadAttention self-attn N{N} L{L} E{E} H{H} r{r} p0.0 {dtype_name(dtype)}"
    return _rows(name, ms, mem, saved, floor, "frozen MHA (floor)", False)


def _rows(name: str, ms: dict, mem: dict, saved: dict, floor: float, base_key: str, sweep: bool) -> list[dict]:
    """One row per baseline of a case (every timed variant but ``ours``), ``ours_vs_base`` against
    the frozen-base variant ``base_key``."""
    return [
        dict(
            case=name,
            baseline=k,
            baseline_ms=ms[k],
            ours_ms=ms["ours"],
            floor_ms=floor,
            baseline_mem_MB=mem[k],
            ours_mem_MB=mem["ours"],
            baseline_saved_MB=saved.get(k),  # None for torch.compile: its graph saves what it decides
            ours_saved_MB=saved["ours"],
            ours_vs_base=ms["ours"] / ms[base_key],
            sweep=sweep,
        )
        for k in ms
        if k != "ours"
    ]
