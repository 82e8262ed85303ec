"""End-to-end training steps (forward, backward, optimizer) with LoRA, models built from configs
with random weights (no downloads):

(a) BERT-base sequence classification, LoRA r=16 on query/key/value/dense, dropout 0.1;
(b) a Llama-style decoder (GQA), LoRA r=16 on all seven projections;
(c) ResNet-50, LoRA r=16 on every residual-stage conv;
(d) QLoRA: the Llama-style decoder loaded in 4 bit (bitsandbytes NF4, bf16 compute), LoRA r=16 on all
    seven projections, dropout 0.1 (skipped where bitsandbytes is not installed).

Baselines: PEFT ``get_peft_model`` + ``torch.optim.AdamW(fused=True)``, eager (and under
``torch.compile`` and captured in a CUDA graph on GPU); ours: ``ftk.apply_lora`` + ``FusedAdamW``,
eager and (GPU) captured in a CUDA graph, the graphed step compared with the graphed baseline;
ours with every LoRA layer its own node (no shared-input groups), to show what grouping gives; and
ours keeping every LoRA input for backward (no rebuild from its producer), to show the memory the
rebuild saves and what it costs.
The floor, measured in the same run: the frozen model's forward plus input-gradient backward (no
weight gradients, no optimizer). GPU sizes are the issue's (BERT 32x128, Llama hidden 2048 / 8 layers / 16-4 heads /
vocab 32000 at 4x1024 bf16, ResNet-50 batch 64 bf16 autocast); CPU sizes are scaled down to finish
in minutes (and tiny with ``--quick``).
"""

from __future__ import annotations

import copy
import gc
import os
import sys

import torch
import torch.nn.functional as F

from ..graphed_step import GraphedTrainStep
from ..nn.lora_group import ungroup
from ..nn.lora_linear import LoRALinear
from ..ops import input_recompute
from ..optim import FusedAdamW
from ..peft_compat import apply_lora
from .common import compile_baselines, peak_extra_mb, time_rounds_ms
from .models import resnet50

R = 16
ALONE = "ours, each LoRA layer alone"  # the variant without shared-input groups
SAVED = "ours, LoRA inputs saved"  # the variant that keeps every LoRA input instead of rebuilding it


def _bert(device, quick, cpu):
    from transformers import BertConfig, BertForSequenceClassification

    if quick:
        cfg, batch, seq = (
            BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
            2,
            32,
        )
    elif cpu:
        cfg, batch, seq = BertConfig(), 2, 64
    else:
        cfg, batch, seq = BertConfig(), 32, 128
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0  # the LoRA dropout is what is measured
    model = BertForSequenceClassification(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    loss = lambda m: m(input_ids=ids, labels=labels).loss  # noqa: E731
    target = dict(target_modules=["query", "key", "value", "dense"], dropout=0.1)
    return model, loss, target, f"BERT-{'tiny' if quick else 'base'} cls {batch}x{seq}", None


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _decoder(quick, cpu, multiple: int = 1):
    """The Llama-style decoder's ``(config, batch, seq)`` (GQA 16/4 heads) at the suite's sizes, the MLP
    width rounded up to ``multiple``."""
    from transformers import LlamaConfig

    if quick:
        dims, batch, seq = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, vocab_size=1000), 1, 64
    elif cpu:
        dims, batch, seq = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, vocab_size=8000), 1, 256
    else:
        dims, batch, seq = (
            dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, vocab_size=32000),
            4,
            1024,
        )
    dims["intermediate_size"] = -(-dims["intermediate_size"] // multiple) * multiple
    cfg = LlamaConfig(**dims, num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=seq)
    return cfg, batch, seq


def _llama(device, quick, cpu):
    from transformers import LlamaForCausalLM

    cfg, batch, seq = _decoder(quick, cpu)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    loss = lambda m: m(input_ids=ids, labels=ids).loss  # noqa: E731
    dtype = torch.bfloat16 if device.type == "cuda" else None
    name = f"Llama-style h{cfg.hidden_size} x{cfg.num_hidden_layers} GQA 16/4 {batch}x{seq}"
    return model, loss, dict(target_modules=PROJECTIONS, dropout=0.0), name, dtype


def _resnet(device, quick, cpu):
    batch, res = (2, 64) if quick else ((8, 112) if cpu else (64, 224))
    model = resnet50()
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = x.to(memory_format=fmt)
    loss = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    targets = [
        f"{i}.{n}" for i in range(4, 8) for n, mod in model[i].named_modules() if isinstance(mod, torch.nn.Conv2d)
    ]
    return model, loss, dict(target_modules=targets, dropout=0.0), f"ResNet-50 {batch}@{res}", None


def has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _qlora(device, quick, cpu):
    import tempfile
    import warnings

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    cfg, batch, seq = _decoder(quick, cpu, multiple=64)  # (bitsandbytes' CPU kernels want 64-multiples)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaForCausalLM(cfg).save_pretrained(d)  # (random weights; from_pretrained is what quantizes)
        model = AutoModelForCausalLM.from_pretrained(d, quantization_config=quant, device_map=device)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    loss = lambda m: m(input_ids=ids, labels=ids).loss  # noqa: E731
    name = f"QLoRA NF4 Llama-style h{cfg.hidden_size} x{cfg.num_hidden_layers} {batch}x{seq}"
    return model, loss, dict(target_modules=PROJECTIONS, dropout=0.1), name, None


def _floor_inputs(model):
    """Make the frozen model's first activation require grad, so backward computes input gradients only."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    else:
        model[0].register_forward_hook(lambda m, i, o: o.requires_grad_(True))


def _step(model, opt, loss_fn, device, autocast):
    """One training step: forward (under autocast when given), backward, optimizer (None: floor)."""

    def fn():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = loss_fn(model)
        loss.backward()
        if opt is not None:
            opt.step()

    return fn


def graphed_step(model, opt, loss_fn, device, autocast, warmup: int = 3) -> GraphedTrainStep:
    """The training step as :func:`ftkernels.graphed_train_step` runs it for a user: ``warmup`` eager
    steps on a side stream, then captured once and replayed at each call (one launch, no Python per
    layer: what a host-bound step saves). Inputs are the ones ``loss_fn`` closes over. ``opt`` None
    captures the floor's step (no optimizer, no parameter grads). Returned captured and replayed
    once; raises what capture raises (a host sync, a non-capturable op). The step holds the graph,
    model and optimizer for as long as it lives (the two-graph failure of bench/NOTES.md "Session 7")."""

    def loss_of(model, _batch):
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            return loss_fn(model)

    step = GraphedTrainStep(model, opt, loss_of, warmup=warmup, enabled=True)
    for _ in range(warmup + 1):  # the warm-up, then the capture and its first replay
        step()
    return step


def _graph_variants(floor_model, peft_model, ours, loss_fn, device, autocast) -> dict:
    """``floor + CUDA graph``, ``PEFT + CUDA graph`` (torch's fused AdamW, capturable) and ``ours +
    CUDA graph``: key -> a function that captures that variant and returns its replay. The graphed
    floor is what the graphed steps are held to (the eager floor of a small model is host time).
    Off with FTKERNELS_BENCH_GRAPHS=0."""
    if device.type != "cuda" or os.environ.get("FTKERNELS_BENCH_GRAPHS", "1") == "0":
        return {}
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    torch_opt = lambda m: torch.optim.AdamW(trainable(m), lr=1e-4, fused=True, capturable=True)  # noqa: E731
    ours_opt = lambda m: FusedAdamW(trainable(m), lr=1e-4)  # noqa: E731
    no_opt = lambda m: None  # noqa: E731
    variants = (
        ("floor + CUDA graph", floor_model, no_opt),
        ("PEFT + CUDA graph", peft_model, torch_opt),
        ("ours + CUDA graph", ours, ours_opt),
    )
    return {
        key: (lambda m=model, make=make_opt: graphed_step(m, make(m), loss_fn, device, autocast))
        for key, model, make_opt in variants
    }


def time_graphs(makers: dict, device: torch.device, reps: int, rounds: int) -> dict[str, float]:
    """Median ms per replay of each graphed variant, each captured, timed and released before the
    next capture (one graph pool alive at a time keeps the peak memory of the run down). A variant
    whose capture fails (a host sync in model code) is left out with its error printed."""
    out = {}
    for key, make in makers.items():
        try:
            replay = make()
        except Exception as e:  # a model with a host sync cannot be captured: report, go on
            print(f"e2e: {key} not captured: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
            torch.cuda.synchronize(device)
            continue
        out[key] = time_rounds_ms({key: replay}, device, reps, rounds)[key]
        del replay  # the graph and its memory pool go with the last reference
        gc.collect()
        torch.cuda.synchronize(device)
    return out


def _without_recompute(step):
    def fn():
        with input_recompute.enabled(False):
            step()

    return fn


CASES = {"bert": _bert, "llama": _llama, "resnet": _resnet, "qlora": _qlora}


def eager_steps(build, device: torch.device, quick: bool) -> tuple[str, dict, dict]:
    """``(case name, steps, parts)`` of one case: ``steps`` maps each eager variant (``floor``,
    ``PEFT eager``, ``ours``, :data:`ALONE` when ours has shared-input groups, :data:`SAVED` when it
    has LoRA Linear layers) to a closure
    running one training step; ``parts`` holds what the graphed and compiled variants need (models,
    optimizers, loss, autocast dtype). Also used by ``scripts/profile_e2e.py``."""
    from peft import LoraConfig, get_peft_model

    cpu = device.type == "cpu"
    torch.manual_seed(0)
    base, loss_fn, target, name, dtype = build(device, quick, cpu)
    if build is not _qlora:  # (a quantized model is loaded onto its device)
        base = base.to(device)
    if dtype is not None:
        base = base.to(dtype)
    autocast = torch.bfloat16 if (device.type == "cuda" and build is _resnet) else None
    if device.type == "cuda" and build is _resnet:
        base = base.to(memory_format=torch.channels_last)
    base.train()
    floor_model = copy.deepcopy(base).requires_grad_(False)
    _floor_inputs(floor_model)
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=target["dropout"], target_modules=target["target_modules"]),
    )
    ours = apply_lora(base, target["target_modules"], r=R, alpha=2 * R, dropout=target["dropout"])
    peft_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ours_opt = FusedAdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)
    steps = {
        "floor": _step(floor_model, None, loss_fn, device, autocast),
        "PEFT eager": _step(peft_model, peft_opt, loss_fn, device, autocast),
        "ours": _step(ours, ours_opt, loss_fn, device, autocast),
    }
    if any(getattr(m, "_lora_group", None) is not None for m in ours.modules()):
        # The same model with every LoRA layer its own node: what the shared-input groups (q/k/v as
        # one node) are worth, side by side.
        alone = copy.deepcopy(ours)
        ungroup(alone)
        alone_opt = FusedAdamW([p for p in alone.parameters() if p.requires_grad], lr=1e-4)
        steps[ALONE] = _step(alone, alone_opt, loss_fn, device, autocast)
    if any(isinstance(m, LoRALinear) and m._fused_base for m in ours.modules()):
        # The same model and optimizer keeping each LoRA layer's input for backward instead of
        # rebuilding it from what its producer keeps: the memory the rebuild saves, at what time.
        steps[SAVED] = _without_recompute(steps["ours"])
    parts = dict(
        floor_model=floor_model, peft_model=peft_model, peft_opt=peft_opt, ours=ours, loss_fn=loss_fn, autocast=autocast
    )
    return name, steps, parts


def run(device: torch.device, quick: bool, ceilings: dict, dtype: torch.dtype | None = None) -> tuple[list[dict], dict]:
    """One row per case and baseline; ``floor_ms`` is the frozen model's forward + input-gradient
    backward measured here (``ours_vs_floor`` is the target's ratio: <= 1.25 on an H100). ``dtype``
    (``--dtype``) is not applied: each model keeps its configured precision (GPU: BERT fp32, the
    Llama-style decoder bf16, ResNet-50 bf16 autocast; CPU: fp32)."""
    reps = 2 if quick else (10 if device.type != "cpu" else 3)
    rows = []
    for build in CASES.values():
        if build is _qlora and not has_bitsandbytes():
            print("\ne2e: QLoRA case skipped (bitsandbytes is not installed)", file=sys.stderr, flush=True)
            continue
        name, fns, parts = eager_steps(build, device, quick)
        peft_model, loss_fn, autocast = parts["peft_model"], parts["loss_fn"], parts["autocast"]
        if compile_baselines(device) and not quick:
            fns["PEFT + torch.compile"] = _step(torch.compile(peft_model), parts["peft_opt"], loss_fn, device, autocast)
        rounds = 2 if quick else 3
        ms = time_rounds_ms(fns, device, reps, rounds)
        mem = {k: peak_extra_mb(fn, device) for k, fn in fns.items()}
        makers = _graph_variants(parts["floor_model"], peft_model, parts["ours"], loss_fn, device, autocast)
        graphs = time_graphs(makers, device, reps, rounds)
        ms.update(graphs)
        # A replay allocates nothing (its memory is the graph's pool, reserved at capture): no column.
        mem.update(dict.fromkeys(graphs))
        # Each case as it lands (a GPU case takes minutes, the table prints only at the end).
        print(f"\ne2e {name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), file=sys.stderr, flush=True)
        for k in ms:
            if k in ("floor", "floor + CUDA graph", "ours", "ours + CUDA graph"):
                continue
            # A graphed baseline is compared with our graphed step (when it was captured too).
            mine = "ours + CUDA graph" if k == "PEFT + CUDA graph" else "ours"
            if mine not in ms:
                continue
            # graphed rows against the graphed floor when it was captured
            floor = "floor + CUDA graph" if mine != "ours" and "floor + CUDA graph" in ms else "floor"
            rows.append(
                dict(
                    case=f"{name}: train step" + (", CUDA graph" if mine != "ours" else ""),
                    baseline=k if k in (ALONE, SAVED) else f"{k} + AdamW(fused=True)",
                    baseline_ms=ms[k],
                    ours_ms=ms[mine],
                    floor_ms=ms[floor],
                    baseline_mem_MB=mem[k],
                    ours_mem_MB=mem[mine],
                    floor_mem_MB=mem[floor],
                )
            )
        del fns, parts, peft_model  # free this case's models before building the next
    return rows, {
        "floor": "frozen model forward + input-gradient backward, measured in this run "
        "(captured in a CUDA graph for the graphed rows)"
    }
