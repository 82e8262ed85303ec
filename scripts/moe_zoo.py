"""Probe: LoRA on transformers' mixture-of-experts families vs PEFT, under "all-linear" (CPU, float64).

For each model type: a tiny random model; PEFT's get_peft_model (its v5 conversion picks the experts
and the router), B moved off zero; ``ftk.from_peft`` of it: the largest output difference and the
largest relative difference of the adapters' gradient norms; and ``ftk.apply_lora`` on the same base:
whether it trains the same tensor shapes as PEFT. Usage:
``PYTHONPATH=. python scripts/moe_zoo.py [model_type ...]`` (default: every family below)."""

import copy
import sys
import warnings

import peft
import torch
import transformers as tf
from torch import nn

import ftkernels as ftk
from ftkernels.nn import LoRAParams
from ftkernels.peft_compat import lora_modules

SMALL = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=100, head_dim=8, num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=24, first_k_dense_replace=0, n_group=1, topk_group=1, n_shared_experts=1,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    shared_expert_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=64,
    moe_layer_freq=1, num_nextn_predict_layers=0,
)  # fmt: skip
MLA = dict(num_key_value_heads=4)  # multi-head latent attention: as many kv heads as heads
EXTRA = {
    "deepseek_v2": MLA, "deepseek_v3": MLA, "deepseek_v32": MLA, "glm4_moe_lite": MLA, "glm_moe_dsa": MLA,
    "longcat_flash": MLA,
    "flex_olmo": dict(pad_token_id=0, eos_token_id=1, bos_token_id=2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=0),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                  use_mamba_kernels=False),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"]),
}  # fmt: skip
FAMILIES = [
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "granitemoe", "granitemoeshared", "minimax",
    "minimax_m2", "ernie4_5_moe", "hunyuan_v1_moe", "dots1", "exaone_moe", "deepseek_v2", "deepseek_v3",
    "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "flex_olmo", "lfm2_moe", "jamba", "qwen3_next", "afmoe",
    "solar_open", "mellum", "cohere2_moe", "beam", "longcat_flash", "phimoe",
]  # fmt: skip


def probe(model_type: str) -> str:
    cfg = tf.AutoConfig.for_model(model_type, **{**SMALL, **EXTRA.get(model_type, {})})
    torch.manual_seed(0)
    base = tf.AutoModelForCausalLM.from_config(cfg).double().eval()
    base.set_experts_implementation("batched_mm")  # (grouped_mm refuses float64 on CPU)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p.data, std=0.3)
    twin = copy.deepcopy(pm)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(2))
    ref = twin(input_ids=ids, use_cache=False).logits
    ours = ftk.from_peft(pm)
    got = ours(input_ids=ids, use_cache=False).logits
    params = [m for m in lora_modules(ours).values() if isinstance(m, LoRAParams)]
    ref.square().mean().backward()
    got.square().mean().backward()

    def norms(m):
        return sorted(p.grad.norm().item() for p in m.parameters() if p.requires_grad and p.grad is not None)

    gt, go = norms(twin), norms(ours)
    rel = max((abs(a - b) / max(abs(a), 1e-30) for a, b in zip(gt, go, strict=True)), default=0.0)
    mine = ftk.apply_lora(copy.deepcopy(base), "all-linear", r=4, alpha=8)

    def shapes(m):
        return sorted(tuple(p.shape) for p in m.parameters() if p.requires_grad)

    return (
        f"out diff {(got - ref).abs().max().item():.1e}  grad rel {rel:.1e}  LoRAParams {len(params)}"
        f" (experts path {sum(m._fused() for m in params)})  apply_lora trains as PEFT: {shapes(mine) == shapes(twin)}"
    )


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    for mt in sys.argv[1:] or FAMILIES:
        try:
            print(f"{mt:18s} {probe(mt)}", flush=True)
        except Exception as e:  # a family this probe cannot build, or a refusal: say which
            print(f"{mt:18s} {type(e).__name__}: {str(e)[:160]}", flush=True)
