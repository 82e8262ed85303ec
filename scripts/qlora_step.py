"""Time one QLoRA training step (forward + backward) of a small Llama-style model loaded in 4 bit
(bitsandbytes NF4): PEFT's ``lora.bnb.Linear4bit`` against ``ftk.apply_lora``'s ``LoRAQuantLinear``,
same inputs, alternating, median of ``--repeat``; the bytes each saves for backward (the unique
storages autograd saves during the forward, LoRA inputs kept) and the peak memory of one step.

    python scripts/qlora_step.py [--device cuda] [--compute bfloat16] [--dropout 0.1] [--dora]
"""

from __future__ import annotations

import tempfile
import warnings

import torch


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd saves in one forward. (Saved-tensor hooks turn off the
    rebuild of LoRA inputs, :mod:`ftkernels.ops.input_recompute`: this counts ours as if it kept x;
    the peak below sees the rebuild.)"""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(seen.values())


def main() -> None:
    from ftkernels.bench.common import decoder_step_parser

    ap = decoder_step_parser(__doc__, "--compute")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--dora", action="store_true", help="QDoRA (use_dora) instead of LoRA")
    ap.add_argument(
        "--bf16-model",
        action="store_true",
        help="load the unquantized parts in bf16 and skip prepare_model_for_kbit_training (bf16 activations)",
    )
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    import ftkernels as ftk
    from ftkernels.bench.common import lm_train_step, peak_extra_mb, time_rounds_ms

    warnings.filterwarnings("ignore")
    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
    )  # fmt: skip
    torch.manual_seed(0)
    compute = getattr(torch, args.compute)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(cfg).save_pretrained(d)

        def load():
            dtype = torch.bfloat16 if args.bf16_model else torch.float32
            m = AutoModelForCausalLM.from_pretrained(d, quantization_config=quant, device_map=args.device, dtype=dtype)
            return m if args.bf16_model else peft.prepare_model_for_kbit_training(m, use_gradient_checkpointing=False)

        r, p = args.r, args.dropout
        config = peft.LoraConfig(target_modules="all-linear", r=r, lora_alpha=2 * r, lora_dropout=p, use_dora=args.dora)
        theirs = peft.get_peft_model(load(), config)
        ours = ftk.apply_lora(load(), "all-linear", r=r, alpha=2 * r, dropout=p, use_dora=args.dora)
    ids = torch.randint(0, 1000, (args.batch, args.seq), device=args.device)

    dev = torch.device(args.device)
    steps = {"peft": lm_train_step(theirs, ids), "ours": lm_train_step(ours, ids)}
    ms = time_rounds_ms(steps, dev, reps=1, rounds=args.repeat)  # (alternating, a warm-up each)
    a, b = ms["peft"], ms["ours"]
    ma, mb = saved_bytes(theirs, ids) / 2**20, saved_bytes(ours, ids) / 2**20
    pa, pb = (peak_extra_mb(steps[k], dev) for k in ("peft", "ours"))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    what = f"nf4/{args.compute}, p={args.dropout}" + (", QDoRA" if args.dora else "")
    what += ", bf16 model" if args.bf16_model else ""
    print(
        f"{name} {what}: PEFT {a:.1f} ms, ours {b:.1f} ms, {a / b:.2f}x;"
        f" saved for backward PEFT {ma:.1f} MiB, ours {mb:.1f} MiB (inputs kept); peak of a step PEFT {pa:.1f} MB,"
        f" ours {pb:.1f} MB"
    )


if __name__ == "__main__":
    main()
