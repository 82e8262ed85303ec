"""LoRA Conv2d benchmark on ResNet-50: per-layer strategy table and a full training step.

Per layer (every distinct conv shape of ResNet-50's residual stages): forward + backward with
grad_x of the frozen base conv, of ``LoRAConv2d`` with each strategy (``unmerged``, ``merged``;
dropout 0) and with ``auto``, and of PEFT's ``lora.Conv2d``, side by side; then two grouped convs of
ResNeXt-50 32x4d (PEFT's grouped layout, r=32, unmerged only). Full step: ResNet-50
with LoRA r=16 on every residual-stage conv, forward + backward + AdamW on the adapters, ours vs
PEFT eager (bf16 autocast on GPU, fp32 on CPU). Floors: flops / measured matmul rate.
GPU: batch 64 at 224x224; CPU: batch 8 at 112x112 (quick: batch 2 at 64x64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import LoRAConv2d
from .common import input_sets, layer_step, peak_extra_mb, short_dtype, time_rounds_ms
from .models import resnet50


def residual_conv_shapes(batch: int, res: int) -> list[dict]:
    """Distinct (cin, cout, k, stride, H, W) of the residual-stage convs, with how often each occurs."""
    net = resnet50()
    shapes: dict[tuple, int] = {}
    hooks = []
    for stage in list(net)[4:8]:
        for m in stage.modules():
            if isinstance(m, nn.Conv2d):

                def hook(mod, inp, out):
                    key = (mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0], *inp[0].shape[2:])
                    shapes[key] = shapes.get(key, 0) + 1

                hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        net(torch.zeros(1, 3, res, res))
    for h in hooks:
        h.remove()
    return [dict(cin=k[0], cout=k[1], k=k[2], stride=k[3], H=k[4], W=k[5], count=c, N=batch) for k, c in shapes.items()]


def grouped_conv_shapes(batch: int, res: int) -> list[dict]:
    """Two grouped 3x3 convs of ResNeXt-50 32x4d (cardinality 32; stage 1 and stage 3 widths), with
    LoRA r=32 (PEFT's layout needs r to be a multiple of groups)."""
    return [
        dict(cin=128, cout=128, k=3, stride=1, H=res // 4, W=res // 4, count=3, N=batch, groups=32, r=32),
        dict(cin=512, cout=512, k=3, stride=1, H=res // 16, W=res // 16, count=5, N=batch, groups=32, r=32),
    ]


def _peft_conv(base, r, alpha, ours):
    from peft import LoraConfig
    from peft.tuners.lora import Conv2d as PeftConv2d

    layer = PeftConv2d(base, "default", config=LoraConfig(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    return layer


def _settings(device: torch.device, quick: bool, dtype: torch.dtype | None = None):
    """Batch, resolution, repeats and the autocast dtype (None: fp32): bf16 on GPU, fp32 on CPU, or
    ``dtype`` (``--dtype``; the convs' weights stay fp32 under autocast, as in mixed-precision training)."""
    if device.type == "cuda":
        st = dict(batch=64, res=224, autocast=torch.bfloat16, reps=10 if quick else 20)
    elif quick:
        st = dict(batch=2, res=64, autocast=None, reps=2)
    else:
        st = dict(batch=8, res=112, autocast=None, reps=4)
    if dtype is not None:
        st["autocast"] = None if dtype == torch.float32 else dtype
        st["label"] = f" {short_dtype(dtype)}" + ("" if dtype == torch.float32 else " autocast")
    return st


STRATEGIES = ("unmerged", "merged", "auto")


def _with_strategy(layer: LoRAConv2d, strategy: str, step):
    """``step`` run with ``layer.strategy`` set first: one layer serves every strategy's timing."""

    def fn():
        layer.strategy = strategy
        step()

    return fn


def layer_rows(
    device: torch.device, quick: bool, rate: float, r: int = 16, dtype: torch.dtype | None = None
) -> list[dict]:
    """One row per ResNet-50 residual-conv shape, then two ResNeXt grouped convs: LoRA conv fwd+bwd,
    PEFT eager vs ours (``rate``: the matmul ceiling, TFLOP/s, for the flop floor: forward and grad_x
    of the base conv and of A). Grouped rows run unmerged only (a grouped base cannot be merged) and
    carry no strategy columns."""
    st = _settings(device, quick, dtype)
    rows = []
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for c in residual_conv_shapes(st["batch"], st["res"]) + grouped_conv_shapes(st["batch"], st["res"]):
        torch.manual_seed(0)
        groups, rc = c.get("groups", 1), c.get("r", r)

        def conv(c=c, groups=groups):
            return nn.Conv2d(c["cin"], c["cout"], c["k"], c["stride"], c["k"] // 2, bias=False, groups=groups)

        base = conv().to(device).to(memory_format=fmt).requires_grad_(False)
        ours = LoRAConv2d(base, r=rc, alpha=2 * rc)
        with torch.no_grad():
            ours.lora_B.normal_(std=1e-3)
        peft_base = conv().to(device)
        peft_base.load_state_dict(base.state_dict())
        peft = _peft_conv(peft_base.requires_grad_(False), rc, 2 * rc, ours)
        with torch.no_grad():
            out_shape = base(torch.empty(1, c["cin"], c["H"], c["W"], device=device)).shape[1:]

        def make(c=c, out_shape=out_shape):
            x = torch.randn(c["N"], c["cin"], c["H"], c["W"], device=device).to(memory_format=fmt)
            return x.requires_grad_(True), torch.randn(c["N"], *out_shape, device=device).to(memory_format=fmt)

        sets = input_sets(make, device)  # x/g sets cycled so each call streams its inputs from memory
        x, g = [s[0] for s in sets], [s[1] for s in sets]
        fns = {"base": layer_step(base, x, g, st["autocast"]), "PEFT eager": layer_step(peft, x, g, st["autocast"])}
        strategies = STRATEGIES if groups == 1 else ("auto",)
        fns.update({s: _with_strategy(ours, s, layer_step(ours, x, g, st["autocast"])) for s in strategies})
        ms = time_rounds_ms(fns, device, st["reps"])
        fns["auto"]()  # the call sets last_strategy: what auto picked for this shape
        shape = f"{c['cin']}->{c['cout']} k{c['k']} s{c['stride']}" + (f" g{groups} r{rc}" if groups > 1 else "")
        oh, ow = (c["H"] + c["stride"] - 1) // c["stride"], (c["W"] + c["stride"] - 1) // c["stride"]
        pixel_macs = c["cin"] * c["k"] ** 2 * (c["cout"] // groups + rc)  # base conv + the A conv
        flops = 2 * 2 * c["N"] * oh * ow * pixel_macs  # forward + grad_x
        row = dict(
            case=f"{shape} @{c['H']}x{c['W']} (x{c['count']}){st.get('label', '')}",
            baseline="PEFT eager",
            baseline_ms=ms["PEFT eager"],
            ours_ms=ms["auto"],
            floor_ms=flops / rate * 1e3,
            ours_vs_base=ms["auto"] / ms["base"],
            base_ms=ms["base"],
            count=c["count"],
        )
        if groups == 1:
            best = "merged" if ms["merged"] < ms["unmerged"] else "unmerged"
            row.update(unmerged_ms=ms["unmerged"], merged_ms=ms["merged"], strategy=ours.last_strategy, best=best)
        rows.append(row)
    return rows


def _lora_resnet(device, r, ours: bool, fmt):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = resnet50().to(device).to(memory_format=fmt)
    targets = [f"{i}.{n}" for i in range(4, 8) for n, m in net[i].named_modules() if isinstance(m, nn.Conv2d)]
    if not ours:
        return get_peft_model(net, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    net.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name)
        setattr(parent, child, LoRAConv2d(getattr(parent, child), r=r, alpha=2 * r))
    return net


def step_rows(device: torch.device, quick: bool, r: int = 16, dtype: torch.dtype | None = None) -> list[dict]:
    """A ResNet-50 training step with LoRA r on the residual convs, PEFT eager vs ours (time and peak memory)."""
    st = _settings(device, quick, dtype)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = torch.randn(st["batch"], 3, st["res"], st["res"], device=device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (st["batch"],), device=device)
    fns = {}
    for key in ("PEFT eager", "ours"):
        model = _lora_resnet(device, r, key == "ours", fmt).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def fn(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=st["autocast"], enabled=st["autocast"] is not None):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        fns[key] = fn
    ms = time_rounds_ms(fns, device, st["reps"])
    mem = {k: peak_extra_mb(fn, device) for k, fn in fns.items()}
    label = f"{short_dtype(st['autocast'])} autocast" if st["autocast"] is not None else "fp32"
    return [
        dict(
            case=f"ResNet-50 train step, LoRA r{r} on residual convs, batch {st['batch']} @{st['res']} {label}",
            baseline="PEFT eager",
            baseline_ms=ms["PEFT eager"],
            ours_ms=ms["ours"],
            baseline_mem_MB=mem["PEFT eager"],
            ours_mem_MB=mem["ours"],
        )
    ]


def run(device: torch.device, quick: bool, ceilings: dict, dtype: torch.dtype | None = None) -> tuple[list[dict], dict]:
    """Per-layer rows (``strategy`` chosen, ``best`` measured, ``ours_vs_base``) and the full step, under
    autocast to ``dtype`` (``--dtype``; default bf16 on GPU, fp32 on CPU)."""
    rate = ceilings["matmul_TFLOPs"] * 1e12
    rows = layer_rows(device, quick, rate, dtype=dtype)
    rows += step_rows(device, quick, dtype=dtype)
    layers = [r for r in rows if "strategy" in r]
    agree = sum(r["strategy"] == r["best"] for r in layers)
    return rows, {"strategy_matches_best": f"{agree}/{len(layers)}"}
