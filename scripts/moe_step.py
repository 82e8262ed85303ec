"""Time one LoRA training step (forward + backward) of a small Mixtral-style MoE model: PEFT's
``target_parameters`` (the folded expert stack) against ``ftk.apply_lora`` (``LoRAParams``'s experts
path), on the same inputs, alternating, median of ``--repeat``.

    python scripts/moe_step.py [--device cuda] [--dtype bfloat16] [--hidden 512] [--experts 8]
"""

from __future__ import annotations

import copy
import warnings

import torch


def main() -> None:
    from ftkernels.bench.common import decoder_step_parser

    ap = decoder_step_parser(__doc__, "--dtype")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import peft
    from transformers import MixtralConfig, MixtralForCausalLM

    import ftkernels as ftk
    from ftkernels.bench.common import lm_train_step, time_rounds_ms

    warnings.filterwarnings("ignore")
    cfg = MixtralConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, num_local_experts=args.experts,
        num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    base = MixtralForCausalLM(cfg).to(args.device, getattr(torch, args.dtype))
    config = peft.LoraConfig(target_modules="all-linear", r=args.r, lora_alpha=2 * args.r)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = ftk.apply_lora(copy.deepcopy(base), "all-linear", r=args.r, alpha=2 * args.r)
    ids = torch.randint(0, 1000, (args.batch, args.seq), device=args.device)

    steps = {"peft": lm_train_step(theirs, ids), "ours": lm_train_step(ours, ids)}
    ms = time_rounds_ms(steps, torch.device(args.device), reps=1, rounds=args.repeat)  # (alternating)
    a, b = ms["peft"], ms["ours"]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name} {args.dtype}: PEFT {a:.1f} ms, ours {b:.1f} ms, {a / b:.2f}x")


if __name__ == "__main__":
    main()
