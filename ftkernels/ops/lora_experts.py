"""LoRA on a mixture-of-experts layer's stacked expert weights, computed without materializing them.

transformers v5 stores an MoE layer's experts as 3-D parameters (``gate_up_proj`` ``[E, 2I, H]``
and ``down_proj`` ``[E, H, I]``, or ``[E, in, out]`` where the class sets ``is_transposed``) and
runs them through an ``experts_implementation`` (eager loop, ``batched_mm``, ``grouped_mm``, ...).
PEFT adapts such a parameter (``target_parameters``, ``lora.ParamWrapper``) by folding
``W_e + s B_e A_e`` into a full copy of the stack before every call: each step pays a second copy
of every expert's weights and, in backward, their dense weight gradient. Here each projection is

    y_t = x_t W_e^T (+ b_e) + s (x_t A_e^T) B_e^T        for a token t routed to expert e

on the token copies sorted by expert, following transformers' ``grouped_mm`` implementation step
for step (the module's ``_apply_gate`` / ``act_fn``, biases, ``post_expert_norm``, routing
weights), so the frozen ``W`` gets neither a copy nor a gradient.

Adapter layout is PEFT's ``ParamWrapper``: ``A`` is ``[E*r, in]`` (rows ``e*r .. e*r+r-1`` are
expert ``e``'s) and ``B`` is ``[out, r*E]`` (column ``j*E + e`` is expert ``e``'s ``j``-th).
"""

from __future__ import annotations

import torch

GATED_UP, UP, DOWN = "gate_up_proj", "up_proj", "down_proj"


def factors(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert ``(A_e^T, B_e^T)`` of PEFT's layout: ``[E, in, r]`` and ``[E, r, out]`` (views)."""
    a_t = lora_a.view(num_experts, -1, lora_a.shape[-1]).transpose(1, 2)
    b_t = lora_b.view(lora_b.shape[0], -1, num_experts).permute(2, 1, 0)
    return a_t, b_t


def delta(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int, transposed: bool) -> torch.Tensor:
    """``B_e A_e`` for every expert: ``[E, out, in]``, or ``[E, in, out]`` where ``transposed``
    (unscaled; a 2-D parameter, ``num_experts=1``, gets ``[1, out, in]``)."""
    a_t, b_t = factors(lora_a, lora_b, num_experts)
    return torch.bmm(a_t, b_t) if transposed else torch.bmm(a_t, b_t).transpose(1, 2)


def is_standard(module: torch.nn.Module) -> bool:
    """True for an experts class built with transformers' ``use_experts_implementation`` (the
    contract its ``grouped_mm`` implementation runs on), outside expert parallelism."""
    needed = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "num_experts", DOWN)
    return all(hasattr(module, a) for a in needed) and not getattr(module, "_is_expert_parallel", False)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``x`` ``[S, in]`` sorted by expert (``counts[e]`` rows each) times ``w[e]`` ``[in, out]``:
    ``[S, out]``. A loop over the experts that have tokens: autograd then skips the frozen weights'
    gradient. (torch's grouped GEMM, ``F.grouped_mm``, is the GPU step for layers with many
    experts; its CPU backward fails on an expert with no tokens in torch 2.13, so it is not used.)"""
    pieces, start = [], 0
    for e, c in enumerate(counts):
        if c:
            pieces.append(x[start : start + c] @ w[e])
            start += c
    return torch.cat(pieces) if pieces else x.new_zeros(0, w.shape[-1])


def _project(module, name: str, x, expert_ids, counts, lora) -> torch.Tensor:
    """One projection of the sorted tokens: base (+ bias) + LoRA (``lora``: ``(A, B, scaling)`` or None)."""
    weight = getattr(module, name)
    w_t = weight if module.is_transposed else weight.transpose(-2, -1)
    y = grouped_matmul(x.to(weight.dtype), w_t, counts)
    if module.has_bias:
        y = y + getattr(module, f"{name}_bias")[expert_ids]
    if lora is not None:
        lora_a, lora_b, scaling = lora
        a_t, b_t = factors(lora_a, lora_b, module.num_experts)
        u = grouped_matmul(x.to(lora_a.dtype), a_t, counts)
        y = y + (grouped_matmul(u, b_t, counts) * scaling).to(y.dtype)
    return y


def experts_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    loras: dict,
) -> torch.Tensor:
    """An experts module's output with LoRA on its stacked weights.

    ``hidden_states`` ``[T, H]``, ``top_k_index`` ``[T, k]`` (expert ids), ``top_k_weights``
    ``[T, k]``; ``loras``: parameter name (``gate_up_proj`` / ``up_proj`` / ``down_proj``) ->
    ``(A, B, scaling)``. Returns ``[T, H]`` in ``hidden_states``' dtype:
    ``sum_j w_tj * down_e(act(up_e(x_t)))`` with ``e = top_k_index[t, j]``, each projection
    adapted as in the module docstring."""
    num_experts, k = module.num_experts, top_k_index.size(-1)
    num_tokens, hidden = hidden_states.shape
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids, stable=True)
    x = hidden_states[perm // k]
    # the one host sync: the loop needs the group sizes
    counts = torch.bincount(expert_ids_g, minlength=num_experts).tolist()
    if len(counts) != num_experts:  # (bincount refuses negative ids itself)
        raise ValueError(f"experts: expert ids outside [0, {num_experts}) in top_k_index")
    up = GATED_UP if module.has_gate else UP
    h = _project(module, up, x, expert_ids_g, counts, loras.get(up))
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    y = _project(module, DOWN, h, expert_ids_g, counts, loras.get(DOWN))
    if module.has_post_expert_norm:
        y = module.post_expert_norm(y)
    y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return y[inv].view(num_tokens, k, hidden).sum(dim=1).to(hidden_states.dtype)
