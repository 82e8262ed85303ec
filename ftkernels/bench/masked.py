"""Masked-update benchmark.

1. ``MaskedLinear`` with 10% of its output rows trainable: the weight-gradient time against the
   dense ``g^T x`` (target <= 0.15x: 1.5x of the ideal 10%) for random rows and for one contiguous
   block, each against its floor (flops or bytes, whichever is larger: random rows touch most of g,
   a block 10% of it; see ``wgrad_floor_ms``), and the whole forward + backward against a fully
   trainable ``nn.Linear``. GPU: M=8192, K=N=4096, bf16; CPU: M=2048, K=N=1024 fp32.
2. BERT-base with the bottom 8 of 12 layers frozen by ``ftk.freeze``: a training step against the
   same model trained fully and against hand-written ``requires_grad_(False)`` on those layers
   (we must be no slower). CPU: batch 2 x 64 tokens (quick: a 4-layer, 256-wide BERT).
3. ``FusedAdamW`` over params with random 1%, 10%, 50% element masks: step time and optimizer-state
   memory with compact state against the dense masked state (``compact_threshold = 0``). At 50%
   the state stays dense by design (compact only pays below half), so that row shows parity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import masks
from ..freeze import freeze
from ..nn import MaskedLinear
from ..nn.masked import _ROWS, masked_weight_grad_linear, wgrad_choices
from ..optim import FusedAdamW
from .common import dtype_name, layer_step, peak_extra_mb, short_dtype, step_inputs, time_rounds_ms


def touched_bytes(n_rows: int, cols: torch.Tensor, elem: int, sector: int = 32) -> int:
    """Bytes of a row-major ``[n_rows, C]`` tensor that reading the columns ``cols`` of every row must
    fetch: whole ``sector``-byte sectors (DRAM's unit), one per distinct ``col * elem // sector``."""
    return n_rows * torch.unique(cols.cpu() * elem // sector).numel() * sector


def wgrad_floor_ms(M: int, K: int, N: int, kept: torch.Tensor, elem: int, rate: float, bw: float) -> float:
    """The rows-mode weight gradient's floor: the larger of its flops (``2 M K`` per kept row) over the
    matmul rate and its bytes over the copy bandwidth. The bytes: all of x ``[M, K]`` (every kept row
    reads all of it), the sectors of g ``[M, N]`` its kept columns touch (81.6% of g for 10% random
    columns in bf16; 10% for a contiguous block), and the full-shape gradient ``[N, K]`` written."""
    flops = 2 * M * K * kept.numel()
    nbytes = M * K * elem + touched_bytes(M, kept, elem) + N * K * elem
    return max(flops / rate, nbytes / bw) * 1e3


def linear_rows(
    device: torch.device, quick: bool, rate: float, bw: float, dtype: torch.dtype | None = None
) -> list[dict]:
    """A Linear with 10% of its output rows trainable: the weight gradient, dense vs ``MaskedLinear``, for
    random rows and for one contiguous block (whole heads, say; each rows route timed too on a GPU), and
    the layer's fwd+bwd with the random rows."""
    if device.type == "cuda":
        M, K, N, own = 8192, 4096, 4096, torch.bfloat16
    else:
        M, K, N, own = (512, 512, 512, torch.float32) if quick else (2048, 1024, 1024, torch.float32)
    dtype = dtype or own
    reps = 5 if quick else 20
    torch.manual_seed(0)
    lin = nn.Linear(K, N, device=device, dtype=dtype)
    x, g = step_inputs((M, K), (M, N), device, dtype)
    turn = [0]  # the weight-gradient variants cycle through the same x/g sets as the steps

    def inputs():
        i = turn[0] = (turn[0] + 1) % len(x)
        return g[i], x[i].detach()

    wshape = lin.weight.shape

    def dense_wgrad():
        gi, xi = inputs()
        return gi.t() @ xi

    name = f"Linear M{M} K{K} N{N} {dtype_name(dtype)}, 10% rows trainable"  # random rows unless named
    n_keep = max(1, round(0.1 * N))
    block = torch.zeros(N, dtype=torch.bool, device=device)
    block[N // 2 : N // 2 + n_keep] = True  # mid-tensor, so no alignment luck at row 0
    rows, layers = [], {}
    # the random rows keep the case name of earlier result files (``--compare`` matches names)
    for kind, mask in (
        ("", masks.rows(lin.weight, keep=0.1, by="random")),
        (", one contiguous block", block.view(N, 1).expand(N, K).clone()),
    ):
        masked = MaskedLinear.from_linear(nn.Linear(K, N, device=device, dtype=dtype), mask)
        layers[kind] = masked
        plan = masked.plan
        variants = {
            "dense": dense_wgrad,
            "masked": lambda plan=plan: masked_weight_grad_linear(*inputs(), plan, lin.weight.shape),
        }
        if device.type == "cuda":  # every route of the rows-mode gradient, whichever the op picked
            for route_name, route in _ROWS.items():
                variants[f"{route_name} route"] = lambda route=route, plan=plan: route(*inputs(), plan, wshape)[0]
        wg = time_rounds_ms(variants, device, reps)
        kept = mask[:, 0].nonzero().flatten()
        rows.append(
            dict(
                case=f"{name}{kind}: weight gradient",
                baseline="dense g^T x",
                baseline_ms=wg["dense"],
                ours_ms=wg["masked"],
                floor_ms=wgrad_floor_ms(M, K, N, kept, dtype.itemsize, rate, bw),
                vs_ideal=wg["masked"] / (0.1 * wg["dense"]),
                routes_ms={k: v for k, v in wg.items() if k.endswith("route")} or None,
            )
        )

    steps = {"dense": layer_step(lin, x, g), "masked": layer_step(layers[""], x, g)}
    full = time_rounds_ms(steps, device, reps)
    flops = 2 * M * N * K
    rows.append(
        dict(
            case=f"{name}: forward + backward",
            baseline="nn.Linear, all trainable",
            baseline_ms=full["dense"],
            ours_ms=full["masked"],
            floor_ms=2.2 * flops / rate * 1e3,
            baseline_mem_MB=peak_extra_mb(steps["dense"], device),
            ours_mem_MB=peak_extra_mb(steps["masked"], device),
        )
    )
    return rows


def _bert(device, quick):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if quick:
        cfg = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    else:
        cfg = BertConfig()  # BERT-base: 12 layers, 768 wide
    return BertForSequenceClassification(cfg).to(device).train()


def bert_rows(device: torch.device, quick: bool) -> list[dict]:
    """BERT-base-like step with the bottom 8 of 12 layers frozen by ``ftkernels.freeze``, against the full
    model and against hand-written ``requires_grad_(False)``."""
    batch, seq = (32, 128) if device.type == "cuda" else (2, 64)
    reps = 3 if quick else (20 if device.type == "cuda" else 5)
    ids = torch.randint(0, 30000, (batch, seq), device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    n_frozen = 2 if quick else 8
    models = {
        "full": _bert(device, quick),
        "ftk.freeze": _bert(device, quick),
        "requires_grad_(False)": _bert(device, quick),
    }
    freeze(models["ftk.freeze"], frozen=["bert.embeddings.*"] + [f"bert.encoder.layer.{i}.*" for i in range(n_frozen)],
           verbose=False)  # fmt: skip
    hand = models["requires_grad_(False)"]
    hand.bert.embeddings.requires_grad_(False)
    for i in range(n_frozen):
        hand.bert.encoder.layer[i].requires_grad_(False)
    fns = {}
    for k, model in models.items():
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def fn(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(input_ids=ids).logits, labels).backward()
            opt.step()

        fns[k] = fn
    ms = time_rounds_ms(fns, device, reps)
    layers = len(models["full"].bert.encoder.layer)
    name = f"BERT {'tiny' if quick else 'base'} step, bottom {n_frozen}/{layers} layers frozen, batch {batch}x{seq}"
    return [
        dict(case=name, baseline=b, baseline_ms=ms[b], ours_ms=ms["ftk.freeze"])
        for b in ("full", "requires_grad_(False)")
    ]


def _state_mb(opt) -> float:
    """MB of optimizer state proper: moments and compact indices (not the step counts)."""
    tensors = [v for st in opt.state.values() for k, v in st.items() if torch.is_tensor(v) and k != "step"]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def optimizer_rows(device: torch.device, quick: bool, dtype: torch.dtype | None = None) -> list[dict]:
    """AdamW step time and state memory with 1%, 10% and 50% element masks: compact state (ours) vs dense
    masked state."""
    shape, count = ((512, 512), 2) if quick else (((2048, 2048), 12) if device.type == "cuda" else ((1024, 1024), 4))
    reps = 5 if quick else 20
    rows = []
    for keep in (0.01, 0.1, 0.5):
        torch.manual_seed(0)
        fns, mem = {}, {}
        for key, threshold in (("dense", 0.0), ("compact", 0.5)):
            params = [nn.Parameter(torch.randn(shape, device=device, dtype=dtype)) for _ in range(count)]
            for p in params:
                masks.set_grad_mask(p, masks.random(p, keep))
                p.grad = torch.randn_like(p)
            opt = FusedAdamW(params, lr=1e-4, weight_decay=0.01)
            opt.compact_threshold = threshold
            opt.step()  # state allocated in its layout
            fns[key], mem[key] = opt.step, _state_mb(opt)
        ms = time_rounds_ms(fns, device, reps)
        n, kind = count * shape[0] * shape[1], short_dtype(dtype)
        rows.append(
            dict(
                case=f"AdamW step, {n / 1e6:.1f}M {kind} params, {keep:.0%} element mask (MB = optimizer state)",
                baseline="dense masked state",
                baseline_ms=ms["dense"],
                ours_ms=ms["compact"],
                baseline_mem_MB=mem["dense"],
                ours_mem_MB=mem["compact"],
            )
        )
    return rows


def run(device: torch.device, quick: bool, ceilings: dict, dtype: torch.dtype | None = None) -> tuple[list[dict], dict]:
    """Rows: the masked weight gradient (``vs_ideal`` = ours / (10% of dense)), the masked layer
    step, BERT with frozen bottom layers against full training and hand-written freezing, and the
    optimizer's compact against dense masked state."""
    rate, bw = ceilings["matmul_TFLOPs"] * 1e12, ceilings["copy_GBps"] * 1e9
    rows = linear_rows(device, quick, rate, bw, dtype) + bert_rows(device, quick) + optimizer_rows(device, quick, dtype)
    return rows, {"wgrad_choices": {str(k): v for k, v in wgrad_choices().items()}}
