"""Models with fused LoRA layers: ``apply_lora``, ``from_peft``, PEFT-format adapters, merging.

Adapter files use PEFT's format and key names (``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` /
``lora_B.weight`` (``lora_embedding_A`` / ``lora_embedding_B`` and the table's
``base_layer.weight`` for an embedding), and ``base_model.model.<module>.<param>`` for
``modules_to_save``), so
``PeftModel.from_pretrained`` reads what :func:`save_adapter` writes and :func:`load_adapter`
reads what PEFT's ``save_pretrained`` writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings

import torch
from torch import nn

from .nn import (
    LoRAConv1D,
    LoRAConv1d,
    LoRAConv2d,
    LoRAConv3d,
    LoRAConvNd,
    LoRAEmbedding,
    LoRALinear,
    LoRAMultiheadAttention,
    LoRAParams,
)
from .nn._lora_common import release_base, scaling_of
from .nn.lora_conv1d import is_hf_conv1d
from .nn.lora_group import group_shared_inputs, ungroup
from .nn.lora_mha import warn_if_peft_doubles
from .nn.lora_params import ParamAdapter, peft_wrapper_chain
from .nn.lora_quant import LoRAQuantLinear, quant_kind

LORA_TYPES = (LoRALinear, LoRAConvNd, LoRAEmbedding, LoRAMultiheadAttention, LoRAParams)  # LoRAConv1D: a LoRALinear
CONV_LAYERS = (LoRAConv1d, LoRAConv2d, LoRAConv3d)  # each wraps its ``_plain`` torch conv
_TENSOR_KEYS = ("lora_A.weight", "lora_B.weight")  # PEFT's names of A and B in adapter files
_LORA_BIAS_KEY = "lora_B.bias"  # PEFT's lora_bias=True
_EMBEDDING_KEYS = ("lora_embedding_A", "lora_embedding_B")
_MHA_OUT_KEYS = ("base_layer.out_proj.lora_A.weight", "base_layer.out_proj.lora_B.weight")  # PEFT nests out_proj
_PREFIX = "base_model.model."
# PEFT inits that its loader runs again on the base it is given: PiSSA / OLoRA / CorDA / LoftQ /
# LoRA-GA change the base weights (A and B are trained against the residual W - s B0 A0, or LoftQ's
# quantized weight), MiCA freezes B. An adapter file of theirs means nothing without that step, nor
# one made with layer_replication (PEFT's loader stacks the repeated layers first).
_REBUILT_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
_BUILD_KEYS = ("init_lora_weights", "loftq_config", "corda_config", "lora_ga_config", "layer_replication")


def _peft_builds(get) -> dict:
    """The LoraConfig fields (read by ``get(name)``) with which PEFT's loader changes the model beyond
    placing tensors: an init it runs again (:data:`_REBUILT_INITS`) with what that init reads, and
    ``layer_replication``; empty when there is none."""
    init = get("init_lora_weights")
    if not (isinstance(init, str) and init.lower().startswith(_REBUILT_INITS)) and not get("layer_replication"):
        return {}
    return {k: get(k) for k in _BUILD_KEYS if get(k)}


_CONFIG_ATTR = "_ftk_lora_config"


def _adapter_entries(name: str, layer: nn.Module) -> dict[str, tuple]:
    """One LoRA layer's tensors in a PEFT adapter file: key -> ``(layer, attribute)``, or ``(tensor,
    None)`` for the optional embedding table (PEFT saves it with an adapted embedding: added tokens).
    The one map both :func:`save_adapter` and :func:`load_adapter` use. A :class:`LoRAParams` is PEFT's
    chain of ``ParamWrapper`` s, one per parameter nested in registration order (the last one
    outermost): the ``j``-th of ``n`` adapters sits under ``n - 1 - j`` ``base_layer`` s."""
    if isinstance(layer, LoRAParams):
        names = list(layer.adapters)
        out = {}
        for j, pname in enumerate(names):
            at = ".".join([name, *["base_layer"] * (len(names) - 1 - j)])
            out[f"{_PREFIX}{at}.{_TENSOR_KEYS[0]}"] = (layer.adapters[pname], "lora_A")
            out[f"{_PREFIX}{at}.{_TENSOR_KEYS[1]}"] = (layer.adapters[pname], "lora_B")
        return out
    key_a, key_b = _EMBEDDING_KEYS if isinstance(layer, LoRAEmbedding) else _TENSOR_KEYS
    entries = {f"{_PREFIX}{name}.{key_a}": (layer, "lora_A"), f"{_PREFIX}{name}.{key_b}": (layer, "lora_B")}
    if getattr(layer, "dora", False):
        entries[f"{_PREFIX}{name}.lora_magnitude_vector"] = (layer, "lora_magnitude")
    if getattr(layer, "has_lora_bias", False):
        entries[f"{_PREFIX}{name}.{_LORA_BIAS_KEY}"] = (layer, "lora_bias")
    if isinstance(layer, LoRAMultiheadAttention):
        entries[f"{_PREFIX}{name}.{_MHA_OUT_KEYS[0]}"] = (layer, "out_lora_A")
        entries[f"{_PREFIX}{name}.{_MHA_OUT_KEYS[1]}"] = (layer, "out_lora_B")
    if isinstance(layer, LoRAEmbedding):
        entries[f"{_PREFIX}{name}.base_layer.weight"] = (layer.base.weight, None)
    return entries


def _matches(name: str, target) -> bool:
    """PEFT's matching: a string is a full regex match on the module name; a list matches a name
    equal to an entry or ending in ``"." + entry``."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "lora_only", "all")


def peft_param_name(model: nn.Module, name: str) -> str:
    """Our parameter name -> PEFT's key for it in an adapter file (without ``base_model.model.``):
    a LoRA layer's base layer is ``base`` here and ``base_layer`` in PEFT (whose MultiheadAttention
    wraps its out_proj in a LoRA layer of its own: ``base_layer.out_proj.base_layer``)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == "base" and isinstance(owner := model.get_submodule(".".join(parts[:i])), LORA_TYPES):
            rest = parts[i + 1 :]
            if isinstance(owner, LoRAParams):  # PEFT nests one ParamWrapper per adapted parameter
                return ".".join([*parts[:i], *["base_layer"] * len(owner.adapters), *rest])
            if isinstance(owner, LoRAMultiheadAttention) and rest[:1] == ["out_proj"]:
                rest = ["out_proj", "base_layer", *rest[1:]]
            return ".".join([*parts[:i], "base_layer", *rest])
    return name


def _bias_params(model: nn.Module, bias: str) -> dict[str, nn.Parameter]:
    """The biases PEFT's ``bias`` option trains (name -> param): none, the LoRA layers' base biases
    (``"lora_only"``) or every parameter named ``bias`` (``"all"``)."""
    if bias == "all":
        return {n: p for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")}
    if bias == "lora_only":  # (PEFT's MultiheadAttention: the bias of its out_proj's LoRA layer)
        out = {}
        for n, m in lora_modules(model).items():
            n, m = (
                (f"{n}.base.out_proj", m.base.out_proj)
                if isinstance(m, LoRAMultiheadAttention)
                else (f"{n}.base", m.base)
            )
            if getattr(m, "bias", None) is not None:  # (an experts module has none)
                out[f"{n}.bias"] = m.bias
        return out
    return {}


def _all_linear(model: nn.Module, modules_to_save) -> list[str]:
    """PEFT's ``target_modules="all-linear"``: every ``nn.Linear`` and HF ``Conv1D`` except the output
    layer of a Hugging Face model (``get_output_embeddings()``, e.g. ``lm_head``). Modules matched by
    ``modules_to_save`` are left out too: they train in full, an adapter on them would be redundant
    (PEFT leaves a sequence classifier's head out for the same reason)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # the output layer, and whatever is inside a LoRA layer already (its base)
    skip = [n for n, m in model.named_modules() if (m is out_emb and out_emb is not None) or isinstance(m, LORA_TYPES)]
    if modules_to_save:
        skip += [n for n, _ in model.named_modules() if n and _matches(n, modules_to_save)]
    return [
        n
        for n, m in model.named_modules()
        if n
        and (isinstance(m, nn.Linear) or is_hf_conv1d(m))
        and not any(n == k or n.startswith(k + ".") for k in skip)
    ]


def _peft_moe_targets(
    model: nn.Module, target_modules, r: int, alpha: float
) -> tuple[list[str], dict, dict, set | None]:
    """What PEFT's transformers-v5 conversion makes of these targets on a mixture-of-experts model:
    ``(target_parameters, rank_pattern, alpha_pattern, kept)``. transformers v5 stacks the experts' Linear
    layers into 3-D parameters and keeps the router as a bare weight, and PEFT maps ``"all-linear"``
    and the v4 module names onto them (a fused ``gate_up_proj`` gets rank and alpha times the number
    of v4 layers fused into it). It also drops those names from the module targets, so a Linear that
    keeps one (a shared expert's ``gate_proj``) gets no adapter: ``kept`` is the set of module names or
    name tails PEFT still targets (None where nothing was converted). Nothing where there is no such
    model or PEFT cannot tell."""
    if getattr(model, "config", None) is None:
        return [], {}, {}, None
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import _convert_peft_config_moe

        tm = target_modules if isinstance(target_modules, str) else list(target_modules)
        cfg = LoraConfig(target_modules=tm, r=r, lora_alpha=alpha)
        _convert_peft_config_moe(cfg, model)
    except Exception:  # another PEFT / transformers version, or a config it cannot read: no claim
        return [], {}, {}, None
    kept = set(cfg.target_modules) if isinstance(cfg.target_modules, set) else None
    return sorted(cfg.target_parameters or []), dict(cfg.rank_pattern or {}), dict(cfg.alpha_pattern or {}), kept


def _peft_would_move(model: nn.Module, names: list[str]) -> list[str]:
    """Which of these LoRA module names PEFT's loader would map onto stacked experts on this model (its
    v5 conversion of the adapter's target_modules), dropping their adapters."""
    if not names:
        return []
    _, _, _, kept = _peft_moe_targets(model, sorted(names), 1, 1)
    return [] if kept is None else sorted(set(names) - kept)


def _param_targets(model: nn.Module, targets, r, alpha, rank_pattern, alpha_pattern, modules) -> dict[str, dict]:
    """PEFT's ``target_parameters`` rule: module name -> {parameter name: (r, alpha)} for every
    parameter ``<module>.<name>`` equal to or ending in ``"." + target`` (its own parameters only, in
    registration order), ranks and alphas from the patterns (matched on ``<module>.<name>``)."""
    if not targets:
        return {}
    lora = [n for n, m in model.named_modules() if isinstance(m, LORA_TYPES)]
    out: dict[str, dict] = {}
    for mname, mod in model.named_modules():
        if any(mname == n or mname.startswith(n + ".") for n in lora):
            continue
        for pname, _ in mod.named_parameters(recurse=False):
            key = f"{mname}.{pname}" if mname else pname
            if not any(key == t or key.endswith("." + t) for t in targets):
                continue
            if not mname:
                raise ValueError(
                    f"apply_lora: {pname} is a parameter of the model itself; target_parameters needs one of a"
                    " submodule"
                )
            if mname in modules:
                raise ValueError(f"apply_lora: {mname} is targeted both as a module and for its parameter {pname}")
            out.setdefault(mname, {})[pname] = (_pattern(rank_pattern, key, r), _pattern(alpha_pattern, key, alpha))
    return out


def _read_by_parent(model: nn.Module, name: str) -> bool:
    """True for a Linear whose parent reads its weight instead of calling it: nn.MultiheadAttention's
    ``out_proj`` (``F.multi_head_attention_forward`` takes ``out_proj.weight``), so LoRA there would
    silently do nothing (PEFT's ``"all-linear"`` wraps it all the same)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return isinstance(parent, nn.MultiheadAttention) and child == "out_proj"


def _wrap(
    module: nn.Module, r: int, alpha: float, dropout: float, rslora: bool, dora: bool = False, lora_bias: bool = False
) -> nn.Module:
    """The fused LoRA layer for ``module``, in its training mode (a model put in eval before
    ``apply_lora`` stays in eval: no dropout where the model's flag says inference)."""
    return _new_layer(module, r, alpha, dropout, rslora, dora, lora_bias).train(module.training)


def _conv_layer_for(module: nn.Module) -> type | None:
    """The LoRA conv class wrapping ``module`` (an nn.Conv1d / 2d / 3d or subclass), else None."""
    return next((cls for cls in CONV_LAYERS if isinstance(module, cls._plain)), None)


def _new_layer(
    module: nn.Module, r: int, alpha: float, dropout: float, rslora: bool, dora: bool, lora_bias: bool
) -> nn.Module:
    kw = dict(r=r, alpha=alpha, dropout=dropout, rslora=rslora, dora=dora, lora_bias=lora_bias)
    if quant_kind(module) is not None:  # quantized, or its own forward (QLoRA): the base runs itself
        return LoRAQuantLinear(module, **kw)
    if isinstance(module, nn.Linear):
        return LoRALinear(module, **kw)
    conv = _conv_layer_for(module)
    if conv is not None:
        return conv(module, **kw)
    if is_hf_conv1d(module):
        return LoRAConv1D(module, **kw)
    if lora_bias and isinstance(module, (nn.MultiheadAttention, nn.Embedding)):
        raise ValueError(
            f"apply_lora: lora_bias is not supported on an nn.{type(module).__name__} (PEFT refuses it too);"
            " target it in another apply_lora call without lora_bias"
        )
    if isinstance(module, nn.MultiheadAttention):
        return LoRAMultiheadAttention(module, r=r, alpha=alpha, dropout=dropout, rslora=rslora, dora=dora)
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding(module, r=r, alpha=alpha, dropout=dropout, rslora=rslora, dora=dora)
    raise TypeError(
        f"apply_lora: {type(module).__name__} is not a supported target (nn.Linear, nn.Conv1d/2d/3d, nn.Embedding,"
        " nn.MultiheadAttention, HF Conv1D)"
    )


_NESTED_ATTR = "_ftk_use_nested_tensor"


def _guard_encoders(model: nn.Module) -> None:
    """Turn off the nested-tensor inference path of every ``nn.TransformerEncoder`` holding a LoRA
    layer. In eval with a padding mask it packs the batch into a NestedTensor, which only its layers'
    fused path takes; that path is off for layers holding LoRA (it would skip the adapters,
    :func:`ftkernels.nn._lora_common.fast_path_guard`), so the packed batch would reach
    nn.MultiheadAttention's other path and fail. The flag comes back with :func:`unload_lora`."""
    for enc in model.modules():
        if isinstance(enc, nn.TransformerEncoder) and lora_modules(enc) and _NESTED_ATTR not in vars(enc):
            setattr(enc, _NESTED_ATTR, getattr(enc, "use_nested_tensor", False))
            enc.use_nested_tensor = False


def _release_encoders(model: nn.Module) -> None:
    for enc in model.modules():
        if isinstance(enc, nn.TransformerEncoder) and _NESTED_ATTR in vars(enc):
            enc.use_nested_tensor = vars(enc).pop(_NESTED_ATTR)


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> fused LoRA layer, for every one in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_TYPES)}


def apply_lora(
    model: nn.Module,
    target_modules,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    rslora: bool = False,
    modules_to_save=None,
    bias: str = "none",
    use_dora: bool = False,
    target_parameters=None,
    lora_bias: bool = False,
    init_lora_weights=True,
) -> nn.Module:
    """Swap every module matching ``target_modules`` (PEFT's rule: a list of names or name suffixes,
    a regex matched against the full name, or ``"all-linear"``: every Linear / Conv1D but the output
    layer, ``modules_to_save`` and nn.MultiheadAttention's ``out_proj``, which its parent never calls)
    for its fused LoRA layer, in place: ``nn.Linear`` ->
    :class:`LoRALinear` (a bitsandbytes / torchao quantized Linear, or one computing its own output ->
    :class:`LoRAQuantLinear`, QLoRA; HQQ's ``HQQLinear`` too), ``nn.Conv2d`` -> :class:`LoRAConv2d`
    (``nn.Conv1d`` / ``nn.Conv3d`` ->
    :class:`LoRAConv1d` / :class:`LoRAConv3d`), HF ``Conv1D`` -> :class:`LoRAConv1D`,
    ``nn.Embedding`` -> :class:`LoRAEmbedding`, ``nn.MultiheadAttention`` -> :class:`LoRAMultiheadAttention`
    (its packed q/k/v projection and its out_proj, as PEFT's ``lora.MultiheadAttention``).
    Freezes every other parameter except those of ``modules_to_save`` (same matching; e.g. a new
    classifier head; one tied to another module, as an lm_head sharing the embedding, trains its own
    copy, as in PEFT); called again on the same model, it adds layers and keeps training what the
    earlier call trains. ``bias`` is PEFT's: ``"none"``, ``"lora_only"`` (the LoRA layers' base biases
    train too) or ``"all"`` (every bias in the model trains). Sibling LoRA Linear layers that turn out
    to read the same input (q/k/v) then run as one autograd node (DoRA layers run alone)
    (:func:`ftkernels.nn.lora_group.group_shared_inputs`; same results; ``FTKERNELS_LORA_GROUP=0``
    turns it off). ``use_dora=True`` makes the layers DoRA (PEFT's ``use_dora``: a
    trained per-output magnitude, :mod:`ftkernels.nn.dora`). ``lora_bias=True`` is PEFT's ``lora_bias``:
    each Linear / conv layer gets a trained, zero-initialized ``lora_bias`` ``[out]`` (B's bias) and its
    output gains ``scaling * lora_bias`` (not with DoRA, embeddings, nn.MultiheadAttention or
    parameters, as in PEFT). ``init_lora_weights`` is PEFT's: ``True`` (A Kaiming-uniform, B zero; an
    embedding's the other way round), or one of :data:`PEFT_INITS` (``False``, ``"gaussian"``,
    ``"orthogonal"``, ``"mica"``, ``"olora"``, ``"pissa"``, ``"pissa_niter_<k>"``), which PEFT computes
    (``get_peft_model``, then :func:`from_peft`; PiSSA and OLoRA change the base weights, as in PEFT, and
    adapter files keep the init for PEFT's loader); the model must then hold no LoRA layer yet.
    ``target_parameters`` is PEFT's: names of
    parameters (``"experts.gate_up_proj"``, or just ``"gate_up_proj"``: a name matches the full parameter
    name or its tail after a dot) adapted by :class:`LoRAParams`, one per module holding them. Left at
    None, a transformers-v5 mixture-of-experts model gets what PEFT's conversion adds to
    ``target_modules`` (``"all-linear"`` or the v4 names adapt the stacked experts and the router, the
    fused ``gate_up_proj`` with twice r and alpha), and as under PEFT those v4 names then adapt no Linear
    (a shared expert's ``gate_proj``); ``[]`` adapts no parameter. Parameter adapters take
    no dropout or DoRA (PEFT refuses them too). Returns the model. Raises, leaving the
    model as it was, when nothing matches or a match is unsupported."""
    if not isinstance(target_modules, str) and not target_modules and not target_parameters:
        raise ValueError("apply_lora: target_modules is empty")
    if init_lora_weights is not True:
        return _apply_through_peft(
            model, init_lora_weights, target_modules=target_modules, r=r, lora_alpha=alpha, lora_dropout=dropout,
            use_rslora=rslora, modules_to_save=modules_to_save, bias=bias, use_dora=use_dora,
            target_parameters=target_parameters, lora_bias=lora_bias,
        )  # fmt: skip
    if bias not in BIAS_MODES:
        raise ValueError(f"apply_lora: bias must be one of {BIAS_MODES}, got {bias!r}")
    lazy = [n for n, p in model.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:  # their shapes (so the adapters') are unknown, and they cannot be frozen yet
        raise ValueError(
            f"apply_lora: {lazy[0]} is an uninitialized parameter of a lazy module (nn.LazyLinear, ...): run one"
            " forward with a sample batch first, so every shape is known"
        )
    # A second call adds layers: what the first one trains (its modules_to_save, its bias) keeps training.
    earlier = getattr(model, _CONFIG_ATTR, None) or {}
    if earlier.get("peft_builds") and lora_modules(model):
        # (its adapter file tells PEFT's loader to rebuild every target that way: new layers would be too)
        shown = ", ".join(f"{k}={v!r}" for k, v in earlier["peft_builds"].items())
        raise ValueError(
            f"apply_lora: the model's LoRA layers were made with {shown}, which PEFT's loader redoes for every"
            " target of the adapter file; layers added now would be saved as made so too: apply every target"
            " in one call"
        )
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    if all_linear:
        names = _all_linear(model, list(modules_to_save or []) + list(earlier.get("modules_to_save") or []))
    else:
        names = [
            n for n, m in model.named_modules() if n and _matches(n, target_modules) and not isinstance(m, LORA_TYPES)
        ]
    names = [n for n in names if not any(n.startswith(o + ".") for o in names)]  # outermost matches only
    inert = [n for n in names if _read_by_parent(model, n)]
    if inert and not all_linear:
        raise ValueError(
            f"apply_lora: {inert[0]} is the out_proj of an nn.MultiheadAttention, which reads out_proj.weight"
            " directly instead of calling it: a LoRA layer there would never run (target its other layers)"
        )
    names = [n for n in names if n not in inert]
    rank_pat, alpha_pat = {}, {}
    implicit = target_parameters is None
    if target_parameters is None:
        target_parameters, rank_pat, alpha_pat, kept = _peft_moe_targets(model, target_modules, r, alpha)
        if kept is not None:  # as PEFT: the module names it moved onto the experts adapt no Linear
            names = [n for n in names if any(n == t or n.endswith("." + t) for t in kept)]
    elif isinstance(target_parameters, str):
        target_parameters = [target_parameters]
    params = _param_targets(model, list(target_parameters), r, alpha, rank_pat, alpha_pat, set(names))
    if target_parameters and not params and not implicit:  # (PEFT's conversion may name absent ones)
        raise ValueError(f"apply_lora: target_parameters={sorted(target_parameters)} matches no parameter")
    if params and (dropout or use_dora or lora_bias):
        raise ValueError(
            f"apply_lora: the parameters {sorted(params)[:2]}... (target_parameters, or the experts / router of a"
            " mixture-of-experts model) take no LoRA dropout, DoRA or lora_bias (PEFT refuses them too); pass"
            " dropout=0, use_dora=False and lora_bias=False, or target_parameters=[] to leave them frozen"
        )
    if not names and not params:
        raise ValueError(f"apply_lora: no module of {type(model).__name__} matches target_modules={target_modules!r}")
    saved = []
    if modules_to_save:
        saved = [n for n, _ in model.named_modules() if n and _matches(n, modules_to_save)]
        if not saved:
            raise ValueError(f"apply_lora: modules_to_save={modules_to_save!r} matches no module")
    saved += [n for n in earlier.get("modules_to_save") or [] if n not in saved]
    if bias == "none":
        bias = earlier.get("bias", "none")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:  # every wrapper is built (and so checked) before the model changes
        wrapped = {n: _wrap(model.get_submodule(n), r, alpha, dropout, rslora, use_dora, lora_bias) for n in names}
        for n, spec in params.items():
            wrapped[n] = LoRAParams(model.get_submodule(n), spec, rslora=rslora).train(model.get_submodule(n).training)
    except Exception:
        for p, flag in flags:  # the wrappers built so far froze their bases
            p.requires_grad_(flag)
        raise
    model.requires_grad_(False)
    for name, layer in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    _untie_saved(model, saved)
    for n in saved:
        model.get_submodule(n).requires_grad_(True)
    for layer in lora_modules(model).values():  # a LoRA layer's own parameters are its adapters
        own = layer.adapters.parameters() if isinstance(layer, LoRAParams) else layer.parameters(recurse=False)
        for p in own:
            p.requires_grad_(True)
    for p in _bias_params(model, bias).values():
        p.requires_grad_(True)
    setattr(
        model,
        _CONFIG_ATTR,
        dict(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            use_rslora=rslora,
            modules_to_save=saved or None,
            bias=bias,
            peft_builds=earlier.get("peft_builds"),
        ),
    )
    _guard_encoders(model)
    group_shared_inputs(model)
    _quantized_training(model)
    return model


# The inits apply_lora leaves to PEFT: computed from the layer alone (no data, no extra config)
PEFT_INITS = (False, "gaussian", "orthogonal", "mica", "olora", "pissa", "pissa_niter_<k>")


def _apply_through_peft(model: nn.Module, init, **config) -> nn.Module:
    """apply_lora with a PEFT init (:data:`PEFT_INITS`): PEFT's get_peft_model on ``model`` (in place),
    then :func:`from_peft`: PEFT's init exactly, base-weight changes included."""
    from peft import LoraConfig, get_peft_model

    known = init is False or (isinstance(init, str) and (init in PEFT_INITS or re.fullmatch(r"pissa_niter_\d+", init)))
    if not known:
        raise ValueError(
            f"apply_lora: init_lora_weights={init!r} is not one apply_lora takes (True or {PEFT_INITS}); inits"
            " needing data or their own config (EVA, CorDA, LoftQ, LoRA-GA): set up PEFT's model, then from_peft"
        )
    if lora_modules(model):
        raise ValueError(
            f"apply_lora: init_lora_weights={init!r} is computed by PEFT, which cannot wrap the fused layers this"
            " model already holds: apply every target in one call"
        )
    peft = get_peft_model(model, LoraConfig(init_lora_weights=init, **config))
    return from_peft(peft)


def _quantized_training(model: nn.Module) -> None:
    """A quantized Hugging Face model that now holds LoRA over its quantized layers: let Trainer take
    it (:func:`ftkernels.integrations.hf.allow_quantized_training`; its check knows PEFT's adapters only)."""
    if getattr(model, "is_quantized", False) and any(isinstance(m, LoRAQuantLinear) for m in model.modules()):
        from .integrations.hf import allow_quantized_training

        allow_quantized_training()


def _param_holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> ``(module, full name)`` of every module holding it (a tied tensor has several)."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((mod, f"{mname}.{pname}" if mname else pname))
    return holders


def _is_adapter_name(name: str) -> bool:
    """A LoRA layer's own adapter tensor (``...lora_A``, ``...lora_B``, ``...lora_magnitude``, ...)."""
    return ".lora_" in name or name.endswith(("lora_A", "lora_B"))


def _keep_untied(model: nn.Module) -> None:
    """A Hugging Face model whose config says its LM head and input embedding are tied while they no
    longer are (PEFT trained a copy of one as ``modules_to_save``): the flag is cleared, so a later
    ``tie_weights()`` (resizing the vocabulary, ...) does not put the untrained tensor back."""
    cfg = getattr(model, "config", None)
    if not getattr(cfg, "tie_word_embeddings", False):
        return
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    if out is not None and inp is not None and getattr(out, "weight", None) is not getattr(inp, "weight", None):
        cfg.tie_word_embeddings = False


def _untie_saved(model: nn.Module, saved: list[str]) -> None:
    """A ``modules_to_save`` module whose parameter is shared with another module (an lm_head tied to
    the input embedding) gets its own copy, as PEFT's ModulesToSaveWrapper trains a copy of each saved
    module (tied ones too, unless PEFT's ``ensure_weight_tying``): trained in place, the shared tensor
    would change the other module too, and an adapter file would not give the same model back. Then
    :func:`_keep_untied` clears ``config.tie_word_embeddings`` so that ``tie_weights()`` keeps the copy."""
    holders = _param_holders(model)
    for n in saved:
        for mod in model.get_submodule(n).modules():
            for pname, p in list(mod.named_parameters(recurse=False)):
                others = [name for m, name in holders.get(id(p), []) if m is not mod]
                if not others:
                    continue
                copy = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                setattr(mod, pname, copy)
                holders[id(p)] = [(m, name) for m, name in holders[id(p)] if m is not mod]
                holders[id(copy)] = [(mod, f"{n}.{pname}")]
                warnings.warn(
                    f"apply_lora: modules_to_save {n} shares {pname} with {others[0]} (tied weights); as in PEFT it"
                    " trains its own copy, and the model is untied",
                    stacklevel=3,
                )
    _keep_untied(model)


def _adapter_names(layer: nn.Module) -> set:
    """The adapters a PEFT LoRA layer holds (an Embedding keeps them in ``lora_embedding_A``)."""
    return set(layer.lora_A.keys()) | set(getattr(layer, "lora_embedding_A", {}).keys())


def _adapter_to_convert(layers: list, adapter_name: str | None) -> str:
    """The one adapter :func:`from_peft` converts: ``adapter_name``, else the model's active one. Raises
    where the converted model could not compute what PEFT's does: adapters disabled (PEFT runs the bases
    alone), several adapters active at once (PEFT sums them; a fused layer holds one), a layer merged
    with another adapter (or with several), or a name no layer holds."""
    known = set().union(*(_adapter_names(m) for m in layers))
    if adapter_name is not None and adapter_name not in known:
        raise ValueError(f"from_peft: no LoRA layer holds adapter {adapter_name!r}; the model has {sorted(known)}")
    if any(getattr(m, "disable_adapters", False) for m in layers):
        raise ValueError(
            "from_peft: the PEFT adapters are disabled (PEFT runs the base model alone); enable them"
            " (enable_adapter_layers()) or use the base model"
        )
    if adapter_name is None:
        active = list(dict.fromkeys(a for m in layers for a in m.active_adapters))
        if len(active) != 1:
            raise ValueError(
                f"from_peft: {len(active)} adapters are active ({active}); PEFT sums active adapters and a fused"
                " layer holds one: pass adapter_name=, or combine them first (PEFT's add_weighted_adapter)"
            )
        adapter_name = active[0]
    for m in layers:
        merged = list(getattr(m, "merged_adapters", []))
        if merged and merged != [adapter_name]:
            raise NotImplementedError(
                f"from_peft: a layer has adapter(s) {merged} merged into its base while {adapter_name!r} is"
                " converted; unmerge first (unmerge_adapter())"
            )
    return adapter_name


def _unwrap_out_proj(module: nn.Module) -> None:
    """Take PEFT's LoRA wrapper off the out_proj of an attention base that goes back to plain."""
    from peft.tuners.lora import LoraLayer

    if isinstance(getattr(module, "out_proj", None), LoraLayer):
        module.out_proj = module.out_proj.get_base_layer()


def from_peft(peft_model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """The model inside a PEFT ``PeftModel`` (or a model holding PEFT LoRA layers) with every PEFT
    LoRA layer replaced by the fused one (sharing the base layer, copying A and B) and every
    ``modules_to_save`` wrapper by its trained copy; outputs are identical, and so is what trains
    (a base bias PEFT trains under ``bias="lora_only"``/``"all"`` stays trainable). Only one adapter
    is converted (``adapter_name`` or the active one); others are dropped with a warning, and a layer
    the converted adapter does not cover goes back to its plain base (as PEFT runs it). Raises, with
    the model unchanged, where PEFT's outputs could not be kept: adapters disabled, several active at
    once, another adapter merged into a base. PEFT's
    ``lora.MultiheadAttention`` becomes :class:`LoRAMultiheadAttention` (its nested out_proj adapter
    included; a merged one raises). PEFT's layers over bitsandbytes / torchao / HQQ bases (and over a
    Linear computing its own output) become :class:`LoRAQuantLinear`. LoRA on other layer types raises
    before anything changes."""
    from peft.tuners.lora import Conv2d as PeftConv2d
    from peft.tuners.lora import Embedding as PeftEmbedding
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Conv1d as PeftConv1d
    from peft.tuners.lora.layer import Conv3d as PeftConv3d
    from peft.tuners.lora.layer import MultiheadAttention as PeftMHA
    from peft.utils import ModulesToSaveWrapper

    model = peft_model
    if hasattr(model, "base_model") and hasattr(model.base_model, "model"):
        model = model.base_model.model
    todo = []  # (name, PEFT module, fused class or None for a modules_to_save wrapper), outermost only
    for name, mod in model.named_modules():
        if not name or any(name.startswith(t[0] + ".") for t in todo):
            continue
        if isinstance(mod, LoraLayer):
            if type(mod).__module__.startswith("peft.tuners.adalora"):  # a LoraLayer, but not LoRA's math
                raise NotImplementedError(
                    f"from_peft: {name} is PEFT's AdaLoRA {type(mod).__name__}: its update B diag(E) A with"
                    " a rank budget is not plain LoRA; the fused layers convert LoRA adapters only"
                )
            base = mod.get_base_layer()
            if peft_wrapper_chain(mod)[0]:  # PEFT's target_parameters (nested: one per parameter)
                todo.append((name, mod, LoRAParams))
                continue
            conv = _conv_layer_for(base) if isinstance(mod, (PeftConv1d, PeftConv2d, PeftConv3d)) else None
            if conv is not None:
                todo.append((name, mod, conv))
            elif isinstance(mod, PeftMHA) and isinstance(base, nn.MultiheadAttention):
                todo.append((name, mod, LoRAMultiheadAttention))
            elif isinstance(mod, PeftEmbedding) and isinstance(base, nn.Embedding):
                todo.append((name, mod, LoRAEmbedding))
            elif isinstance(base, nn.Linear) or is_hf_conv1d(base) or quant_kind(base) is not None:
                todo.append((name, mod, LoRALinear))  # (LoRALinear.from_peft_layer picks the subclass)
            else:  # checked before anything is replaced: a failure leaves the model as it was
                raise NotImplementedError(
                    f"from_peft: {name} is PEFT's {type(mod).__name__} over {type(base).__name__}; fused LoRA"
                    " layers exist for nn.Linear, Hugging Face Conv1D, nn.Conv1d/2d/3d, nn.Embedding and"
                    " nn.MultiheadAttention only"
                )
        elif isinstance(mod, ModulesToSaveWrapper):
            todo.append((name, mod, None))
    if not any(cls is not None for _, _, cls in todo):
        kinds = sorted({str(getattr(c, "peft_type", "")).rpartition(".")[2] for c in _peft_configs(peft_model)})
        held = f" (its PEFT adapters are {', '.join(kinds)}; only LoRA converts)" if kinds else ""
        raise ValueError(f"from_peft: the model holds no PEFT LoRA layer{held}")
    active = _adapter_to_convert([mod for _, mod, cls in todo if cls is not None], adapter_name)
    dropped, built = set(), []
    # Every fused layer is built (and so checked) before the model changes. Building freezes the bases;
    # PEFT's flags come back after (a bias PEFT trains under bias="lora_only"/"all" still trains).
    flags = [(q, q.requires_grad) for q in model.parameters()]
    try:
        for name, mod, cls in todo:
            if cls is None:  # PEFT runs the original module where the adapter saved no copy
                saved = mod.modules_to_save
                built.append((name, saved[active] if active in saved else mod.original_module))
                continue
            names = _adapter_names(mod)
            if cls is LoRAParams:  # every wrapper of the chain
                names = set().union(*map(_adapter_names, peft_wrapper_chain(mod)[0]))
            dropped |= names - {active}
            if active not in names:  # an adapter that skipped this layer: PEFT runs the base alone here
                built.append((name, mod.get_base_layer()))
                continue
            # The new layer takes the wrapper's mode; its base keeps its own, as under PEFT (a base left in
            # eval under a training wrapper computes otherwise for bitsandbytes' int8 layers)
            modes = [(m, m.training) for m in mod.get_base_layer().modules()]
            built.append((name, cls.from_peft_layer(mod, active).train(mod.training)))
            for m, flag in modes:
                m.training = flag
    finally:
        for q, flag in flags:
            q.requires_grad_(flag)
    for name, new in built:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        if isinstance(new, LoRAMultiheadAttention):
            new.adopt_plain_out_proj()
        elif isinstance(new, nn.MultiheadAttention):  # a base left without an adapter
            _unwrap_out_proj(new)
    _guard_encoders(model)
    _keep_untied(model)
    group_shared_inputs(model)
    _quantized_training(model)
    if any(isinstance(new, LoRAMultiheadAttention) for _, new in built):
        warn_if_peft_doubles("from_peft")
    if dropped:
        warnings.warn(f"from_peft: converted adapter only; dropped adapters {sorted(dropped)}", stacklevel=2)
    cfg = getattr(peft_model, "peft_config", {}).get(active)
    if cfg is not None:
        setattr(
            model,
            _CONFIG_ATTR,
            dict(
                r=cfg.r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                use_rslora=cfg.use_rslora,
                # the modules PEFT wrapped, by full name (its config lists name patterns, and for a
                # task type adds heads a model may lack: "classifier" and "score" for SEQ_CLS)
                modules_to_save=[n for n, mod, cls in todo if cls is None and active in mod.modules_to_save] or None,
                bias=getattr(cfg, "bias", "none"),
                task_type=getattr(cfg, "task_type", None),
                # save_adapter writes them back: PEFT's loader then rebuilds the model as here
                peft_builds=_peft_builds(lambda k: getattr(cfg, k, None)) or None,
            ),
        )
    # PEFT's LoRA layers are gone, so are its marks on the model (as PEFT's own unload drops them): with
    # transformers' adapter flag left set (add_adapter / load_adapter), save_pretrained and Trainer's
    # checkpoints failed looking for PEFT layers ("active_adapters" unbound)
    vars(model).pop("peft_config", None)
    if vars(model).get("_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False
    return model


def _token_wrappers(model: nn.Module) -> dict:
    """Name -> PEFT ``TrainableTokensWrapper`` (``trainable_token_indices``: new values for some rows of
    an embedding table), as :func:`from_peft` keeps them. Empty without PEFT."""
    try:
        from peft.utils.other import TrainableTokensWrapper
    except ImportError:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, TrainableTokensWrapper)}


def _token_entries(model: nn.Module) -> dict[str, tuple[nn.Parameter, list[int], str]]:
    """PEFT's adapter-file key -> (values ``[n, dim]``, token indices, module name) of each trainable-tokens
    wrapper that holds its own values (a tied one, e.g. the lm_head of tied embeddings, shares them)."""
    out = {}
    for name, w in _token_wrappers(model).items():
        ad = w.token_adapter
        if ad.tied_adapter is not None:
            continue
        a = w.active_adapters[0]
        key = f"{_PREFIX}{name}.token_adapter.trainable_tokens_delta"
        out[key] = (ad.trainable_tokens_delta[a], [int(i) for i in ad.token_indices[a]], name)
    return out


def _check_mergeable(model: nn.Module, layers: dict, what: str) -> None:
    bad = {name: layer._merge_blocker() for name, layer in layers.items() if not layer.merged}
    bad = {name: reason for name, reason in bad.items() if reason is not None}
    if bad:
        shown = "; ".join(f"{name}: {reason}" for name, reason in list(bad.items())[:3])
        raise NotImplementedError(f"{what}: cannot merge {len(bad)} layer(s) ({shown}); nothing was changed")
    # A weight tied to another layer (tie_word_embeddings: the LM head and the input embedding share one
    # tensor): the adapter changes one of them only, so folding it into the shared tensor would change
    # the other too. PEFT merges anyway (with a warning) and the merged model's logits differ; here it
    # raises.
    holders = _param_holders(model)
    for name, layer in layers.items():
        if layer.merged:
            continue
        for mod in layer.base.modules():  # the merge writes into the base's own parameters
            for p in mod.parameters(recurse=False):
                others = [n for m, n in holders.get(id(p), []) if m is not mod]
                if not others:
                    continue
                what_p = "embedding table" if isinstance(layer, LoRAEmbedding) else "weight"
                raise NotImplementedError(
                    f"{what}: the {what_p} of {name} is tied to {others[0]} (tie_word_embeddings); merging"
                    " its adapter into the shared tensor would change that layer too, and the outputs with it."
                    " Keep the adapter unmerged (unload_lora(merge=False) drops it); nothing was changed"
                )


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Context manager: inside it every fused LoRA layer of ``model`` runs its base layer alone (no
    adapter compute, no adapter gradient), and PEFT's trainable-token wrappers :func:`from_peft` kept
    look up the original rows: the base model's outputs, as PEFT's ``PeftModel.disable_adapter()``
    (a DPO / KL reference pass without a second copy of the model). On exit each layer is as it was.
    Raises, changing nothing, for a model without fused LoRA layers or with merged ones (their base
    weights hold the adapters: ``unmerge_lora`` first; PEFT would unmerge them for good). ``modules_to_save``
    train in place here (PEFT keeps an original copy to switch back to), so they keep their trained
    weights inside: a warning says so."""
    layers = lora_modules(model)
    if not layers:
        raise ValueError("disable_adapters: the model has no fused LoRA layer")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(
            f"disable_adapters: {len(merged)} LoRA layer(s) ({merged[0]}, ...) are merged into their base weights;"
            " unmerge_lora(model) first"
        )
    saved = (getattr(model, _CONFIG_ATTR, None) or {}).get("modules_to_save")
    if saved:
        warnings.warn(
            f"disable_adapters: modules_to_save ({', '.join(saved[:3])}) were trained in place, so they keep their"
            " trained weights inside (PEFT's disable_adapter switches to copies of the originals)",
            stacklevel=3,
        )
    tokens = list(_token_wrappers(model).values())
    before = [(m, m.disabled) for m in layers.values()]
    token_flags = [(w, w.disable_adapters) for w in tokens]
    try:
        for m in layers.values():
            m.disabled = True
        for w in tokens:
            w.enable_adapters(False)
        yield model
    finally:
        for m, flag in before:
            m.disabled = flag
        for w, off in token_flags:
            w.enable_adapters(not off)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every fused LoRA layer's ``scaling * B A`` into its base weight (fp32 accumulation).
    Raises, changing nothing, when a layer cannot be merged (a LoRA on a grouped conv, or on an
    embedding table tied to another layer)."""
    _check_mergeable(model, lora_modules(model), "merge_lora")
    for layer in lora_modules(model).values():
        if not layer.merged:
            layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora`."""
    for layer in lora_modules(model).values():
        if layer.merged:
            layer.unmerge()
    return model


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every fused LoRA layer by its base layer, in place: PEFT's ``merge_and_unload()``
    (``merge=True``: the base weight becomes ``W + scaling B A``, fp32 accumulation, so outputs stay
    the same) or ``unload()`` (``merge=False``: the adapters are dropped, the base weights restored).
    What is left is the plain model, with the original parameter names: ``save_pretrained`` /
    ``from_pretrained`` of the base architecture, or any ``load_state_dict``, take it. Parameters keep
    their ``requires_grad`` (the bases stay frozen). Returns the model. ``merge=True`` raises,
    changing nothing, when a layer cannot be merged (a LoRA on a grouped conv)."""
    layers = lora_modules(model)
    if not layers:
        raise ValueError("unload_lora: the model has no fused LoRA layer")
    if merge:
        _check_mergeable(model, layers, "unload_lora(merge=True)")
    ungroup(model)
    for name, layer in layers.items():  # LoRA layers never nest: each is replaced once
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
        release_base(layer.base)
    for name, w in _token_wrappers(model).items():  # PEFT's trainable tokens: merged in, or dropped
        parent_name, _, child = name.rpartition(".")
        plain = w.unload_and_optionally_merge_module(merge=merge, safe_merge=False, adapter_names=None)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    _release_encoders(model)
    if _CONFIG_ATTR in vars(model):
        delattr(model, _CONFIG_ATTR)
    return model


def save_adapter(model: nn.Module, path: str) -> None:
    """Write the fused LoRA layers' adapters (and ``modules_to_save`` params, and the biases of
    ``bias="lora_only"``/``"all"``) to ``path`` in PEFT's format: ``adapter_config.json`` +
    ``adapter_model.safetensors``. Per-layer ranks or alphas that differ from the common one go to
    ``rank_pattern`` / ``alpha_pattern``. PEFT's trainable tokens (``trainable_token_indices``, kept by
    :func:`from_peft`) are written too, and, as PEFT does, the base model's path (``from_pretrained``'s)
    and the PEFT task type :func:`from_peft` found, so ``AutoPeftModelFor*.from_pretrained`` loads it.
    An adapter :func:`from_peft` took from a PiSSA / OLoRA / CorDA / LoftQ / LoRA-GA / MiCA init keeps its
    ``init_lora_weights``, and one with ``layer_replication`` keeps that (as PEFT's own files do): PEFT's
    loader then rebuilds from the original model what the adapter was trained on."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    layers = lora_modules(model)
    if not layers:
        raise ValueError("save_adapter: the model has no fused LoRA layer")
    meta = getattr(model, _CONFIG_ATTR, {})
    first = next(iter(layers.values()))
    r, alpha = meta.get("r", first.r), meta.get("lora_alpha", first.alpha)
    tensors = {}
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"save_adapter: {name} is merged; unmerge_lora(model) first")
        for key, (owner, attr) in _adapter_entries(name, layer).items():
            t = owner if attr is None else getattr(owner, attr)
            tensors[key] = t.detach().contiguous().cpu()
    adapters = {n: m.adapters for n, m in layers.items() if isinstance(m, LoRAParams)}
    dora = {getattr(m, "dora", False) for m in layers.values()}
    if len(dora) > 1:  # PEFT's use_dora is one flag for the whole adapter
        raise ValueError("save_adapter: some LoRA layers are DoRA and some not; PEFT's format holds one kind")
    lora_bias = {getattr(m, "has_lora_bias", False) for m in layers.values() if not isinstance(m, LoRAParams)}
    if len(lora_bias) > 1:  # so is its lora_bias
        raise ValueError(
            "save_adapter: some LoRA layers have a LoRA bias and some not; PEFT's format holds one lora_bias flag"
        )
    saved = meta.get("modules_to_save") or []
    for name in saved:
        for pname, p in model.get_submodule(name).named_parameters():
            tensors[f"{_PREFIX}{name}.{pname}"] = p.detach().contiguous().cpu()
    bias = meta.get("bias", "none")
    for name, p in _bias_params(model, bias).items():
        tensors.setdefault(f"{_PREFIX}{peft_param_name(model, name)}", p.detach().contiguous().cpu())
    tokens = _token_entries(model)
    for key, (values, _, _) in tokens.items():
        tensors[key] = values.detach().contiguous().cpu()
    base_path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    for key, t in _resized_embeddings(model, base_path).items():
        tensors.setdefault(key, t.detach().contiguous().cpu())
    builds = meta.get("peft_builds") or {}
    if str(builds.get("init_lora_weights", "")).startswith("pissa_niter_"):
        warnings.warn(
            "save_adapter: the adapter's PiSSA init used a randomized SVD (pissa_niter_*); PEFT's loader draws"
            " another one, so a base rebuilt from the original model differs from the one trained on: keep"
            " this model's base weights with the adapter",
            stacklevel=2,
        )
    cfg = LoraConfig(
        bias=bias,
        r=r,
        lora_alpha=alpha,
        lora_dropout=meta.get("lora_dropout", first.dropout),
        use_rslora=meta.get("use_rslora", first.rslora),
        target_modules=sorted(n for n, m in layers.items() if not isinstance(m, LoRAParams)),
        target_parameters=sorted(f"{n}.{p}" for n, a in adapters.items() for p in a) or None,
        modules_to_save=_saved_names(model, saved) or None,
        rank_pattern={n: m.r for n, m in _per_target(layers).items() if m.r != r},
        alpha_pattern={n: m.alpha for n, m in _per_target(layers).items() if m.alpha != alpha},
        fan_in_fan_out=any(isinstance(m, LoRAConv1D) for m in layers.values()),
        use_dora=dora == {True},
        lora_bias=lora_bias == {True},
        trainable_token_indices={name: idx for _, idx, name in tokens.values()} or None,
        # as PEFT writes them: AutoPeftModel* loads the base from this path (a from_pretrained model's)
        base_model_name_or_path=base_path or None,
        task_type=meta.get("task_type"),
        **builds,
    )
    moved = _peft_would_move(model, cfg.target_modules)
    if moved:
        warnings.warn(
            f"save_adapter: PEFT reads the module names of {len(moved)} LoRA layer(s) ({moved[0]}, ...) as the"
            f" transformers-v4 experts of this {model.config.model_type} model and moves them onto the stacked"
            " experts when it loads the adapter, dropping their adapters (their outputs would differ under"
            " PEFT); ftkernels.load_adapter reads them as saved",
            stacklevel=2,
        )
    os.makedirs(path, exist_ok=True)
    # PEFT's auto mapping when there is no task type: the model class AutoPeftModel builds the base with
    auto = (
        None if cfg.task_type else {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    )
    cfg.save_pretrained(path, auto_mapping_dict=auto)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))


def _saved_names(model: nn.Module, saved: list[str]) -> list[str]:
    """``modules_to_save`` names for the adapter config: PEFT wraps every module whose full name ends with
    one (a plain string test), so a module's last name where that picks it alone ("classifier"), else its
    full name ("pooler.dense": "dense" would wrap every dense layer, and PEFT's loader then failed)."""
    names = [n for n, _ in model.named_modules()]
    out = []
    for n in saved:
        leaf = n.rpartition(".")[2]
        out.append(leaf if [k for k in names if k.endswith(leaf)] == [n] else n)
        extra = [k for k in names if k.endswith(n) and k != n and not k.startswith(n + ".")]
        extra += [k for k in names if k.startswith(n + ".") and k.endswith(leaf)]
        if extra:
            warnings.warn(
                f"save_adapter: PEFT reads modules_to_save {n!r} as every module whose name ends with it, so its"
                f" loader would also wrap {extra[0]} and may fail on this file; ftkernels.load_adapter reads it",
                stacklevel=3,
            )
    return out


def _resized_embeddings(model: nn.Module, base_path: str | None) -> dict[str, torch.Tensor]:
    """PEFT's ``save_embedding_layers="auto"``: when the vocabulary differs from the base model's
    (its ``config.json`` at ``base_path``, a local folder here), the input and output embedding
    tables (frozen or not) go into the adapter file under PEFT's keys: rows added by
    ``resize_token_embeddings`` are random, so a fresh base would not have them."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    file = os.path.join(base_path, "config.json") if base_path else None
    if vocab is None or file is None or not os.path.isfile(file) or not hasattr(model, "get_input_embeddings"):
        return {}
    with open(file) as f:
        original = json.load(f).get("vocab_size")
    if original is None or original == vocab:
        return {}
    out = {}
    names = {id(m): n for n, m in model.named_modules()}
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is None or id(layer) not in names:
            continue
        for pname, p in layer.named_parameters():
            full = f"{names[id(layer)]}.{pname}"
            if not _is_adapter_name(full):
                out[f"{_PREFIX}{peft_param_name(model, full)}"] = p
    if out:
        warnings.warn(
            f"save_adapter: the vocabulary ({vocab}) differs from the base model's ({original}): the embedding"
            " tables are saved too, as PEFT does",
            stacklevel=3,
        )
    return out


def _per_target(layers: dict) -> dict:
    """Name -> what carries one r / alpha in PEFT's config: a module's LoRA layer, or a parameter's
    adapter (``<module>.<parameter>``) of a :class:`LoRAParams`."""
    out = {}
    for n, m in layers.items():
        if isinstance(m, LoRAParams):
            out.update({f"{n}.{p}": a for p, a in m.adapters.items()})
        else:
            out[n] = m
    return out


# LoraConfig fields that select a LoRA variant whose forward differs from plain LoRA (PEFT 0.21's
# `is_lora_variant` fields but DoRA, which is supported; MiCA, an init_lora_weights value, is plain LoRA).
_VARIANT_KEYS = (
    "alora_invocation_tokens",
    "arrow_config",
    "use_bdlora",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "use_qalora",
)


def _peft_configs(model: nn.Module) -> list:
    """The PEFT configs a model holds (``PeftModel.peft_config``, or its inner tuner's), as a list."""
    for holder in (model, getattr(model, "base_model", None)):
        cfg = getattr(holder, "peft_config", None)
        if isinstance(cfg, dict):
            return list(cfg.values())
    return []


def load_adapter(model: nn.Module, path: str) -> nn.Module:
    """Read a PEFT-format adapter (``save_pretrained`` of PEFT, or :func:`save_adapter`) into ``model``:
    applies the fused LoRA layers (unless already there) to the modules the file holds adapters for,
    with the config's r, alpha, dropout, ``modules_to_save`` and ``bias``, then loads A, B, the
    ``modules_to_save`` params and the biases of ``bias="lora_only"``/``"all"`` (which then train, as
    under PEFT), DoRA's magnitudes (``use_dora``) and trainable tokens (``trainable_token_indices``, set
    up by PEFT's own code, ties included), and LoRA biases (``lora_bias``). An adapter whose
    ``init_lora_weights`` PEFT's loader runs again (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA: they change the
    base weights A and B were trained against; MiCA: B frozen) is loaded by PEFT into ``model`` (which
    must have no LoRA layer yet) and converted by :func:`from_peft`; so is one with ``layer_replication``.
    PEFT's LoRA variants (aLoRA, Arrow, ...) raise. Raises on missing or unexpected keys and on shapes that do not
    fit (only a LoRA rank may differ from the model's, to the config's; the model's tensors are then
    replaced, with a warning, so build optimizers after loading). Shapes are checked before any tensor
    is written; LoRA layers applied here to a model that had none stay after a failed load (with B = 0
    they leave the outputs unchanged)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_adapter: only LoRA adapters are supported, got peft_type {cfg.get('peft_type')!r}")
    variants = [k for k in _VARIANT_KEYS if cfg.get(k)]
    if variants:  # their forward is not plain LoRA: loading A and B alone would give other outputs
        raise NotImplementedError(
            f"load_adapter: the adapter is a PEFT LoRA variant ({', '.join(variants)}); the fused layers run"
            " plain LoRA and DoRA only"
        )
    if (cfg.get("bias") or "none") not in BIAS_MODES:
        raise ValueError(f"load_adapter: bias must be one of {BIAS_MODES}, got {cfg.get('bias')!r}")
    builds = _peft_builds(cfg.get)
    if builds:
        return _load_through_peft(model, path, builds)
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(file) if os.path.exists(file) else torch.load(os.path.join(path, "adapter_model.bin"))
    fresh = not lora_modules(model)  # layers made here: no optimizer can hold their tensors yet
    if fresh:
        # The layers the file holds adapters for: exactly what PEFT's config selected (target_modules
        # with layers_to_transform, exclude_modules, ...), without re-deriving its rules.
        ends = ("." + _TENSOR_KEYS[0], "." + _EMBEDDING_KEYS[0])
        target_parameters = list(cfg.get("target_parameters") or [])
        holders = set(_param_targets(model, target_parameters, 1, 1, {}, {}, set()))  # their PEFT keys nest
        targets = sorted(
            {
                k[len(_PREFIX) :].rpartition(".lora_")[0]
                for k in tensors
                if k.startswith(_PREFIX) and k.endswith(ends) and not k.endswith(_MHA_OUT_KEYS)
            }
        )
        targets = [t for t in targets if re.sub(r"(\.base_layer)+$", "", t) not in holders]
        if not targets and not holders:
            raise ValueError(f"load_adapter: the adapter in {path} holds no LoRA tensor ({_PREFIX}<module>{ends[0]})")
        apply_lora(
            model,
            targets,
            r=cfg["r"],
            alpha=cfg["lora_alpha"],
            dropout=cfg.get("lora_dropout", 0.0),
            rslora=cfg.get("use_rslora", False),
            modules_to_save=cfg.get("modules_to_save"),
            bias=cfg.get("bias") or "none",
            use_dora=bool(cfg.get("use_dora")),
            target_parameters=target_parameters,
            lora_bias=bool(cfg.get("lora_bias")),
        )
    _wrap_tokens(model, cfg)
    layers = lora_modules(model)
    if bool(cfg.get("use_dora")) != any(getattr(m, "dora", False) for m in layers.values()):
        raise ValueError(
            f"load_adapter: the adapter has use_dora={bool(cfg.get('use_dora'))} but the model's LoRA layers"
            " are of the other kind"
        )
    held = {m.has_lora_bias for m in layers.values() if not isinstance(m, LoRAParams)}
    if held and held != {bool(cfg.get("lora_bias"))}:
        raise ValueError(
            f"load_adapter: the adapter has lora_bias={bool(cfg.get('lora_bias'))} but the model's LoRA layers"
            f" have {'no LoRA bias' if held == {False} else 'LoRA biases'}" + (" (some)" if len(held) > 1 else "")
        )
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    ranks = {  # per-layer (per-parameter) ranks / alphas of the patterns, set once every shape is checked
        layer: (_pattern(rank_pat, name, cfg["r"]), _pattern(alpha_pat, name, cfg["lora_alpha"]))
        for name, layer in _per_target(layers).items()
    }
    params = {}
    for name, layer in layers.items():
        params.update(_adapter_entries(name, layer))  # the table (attribute None) is optional
    bias = cfg.get("bias") or "none"
    biases = _bias_params(model, bias) if bias in BIAS_MODES else {}
    params.update({key: (values, None) for key, (values, _, _) in _token_entries(model).items()})
    for n, p in model.named_parameters():
        if ".token_adapter." in n:  # trainable tokens: their keys are above (PEFT drops the adapter name)
            continue
        if (p.requires_grad or n in biases) and not _is_adapter_name(n):
            params.setdefault(f"{_PREFIX}{peft_param_name(model, n)}", (p, None))
    # Base tensors the file holds (PEFT's saved embedding tables after a vocabulary resize) are written
    # into the model's (frozen) parameters of those names, as PEFT's loader does.
    if any(k not in params for k in tensors):
        named = {f"{_PREFIX}{peft_param_name(model, n)}": p for n, p in model.named_parameters(remove_duplicate=False)}
        params.update({k: (named[k], None) for k in tensors if k not in params and k in named})
    unexpected = [k for k in tensors if k not in params]
    if unexpected:
        raise ValueError(f"load_adapter: keys with no place in the model: {unexpected[:5]}")
    missing = [k for k, (_, attr) in params.items() if attr is not None and k not in tensors]
    if missing:
        raise ValueError(f"load_adapter: the adapter lacks {missing[:5]}")
    for key, t in tensors.items():  # all shapes checked before anything is written
        owner, attr = params[key]
        if attr is None:
            want = tuple(owner.shape)
        else:  # only the rank may differ from the layer's current adapter, and only to the config's r
            cur, r = tuple(getattr(owner, attr).shape), ranks[owner][0]
            groups = owner.base.groups if isinstance(owner, LoRAConvNd) else 1  # B is [out, r / groups, 1, ...]
            if r % groups:
                raise ValueError(f"load_adapter: {key}: rank {r} is not a multiple of the conv's groups={groups}")
            if attr in ("lora_magnitude", "lora_bias"):
                want = cur
            elif isinstance(owner, ParamAdapter):  # A [E*r, in], B [out, r*E]
                e = owner.num_experts
                want = (e * r, cur[1]) if attr == "lora_A" else (cur[0], r * e)
            else:
                want = (r, *cur[1:]) if attr.endswith("lora_A") else (cur[0], r // groups, *cur[2:])
        if tuple(t.shape) != want:
            raise ValueError(
                f"load_adapter: {key} has shape {tuple(t.shape)} in the adapter, the model needs {want}: the adapter"
                " was saved from a model of other sizes"
            )
    for layer, (r, alpha) in ranks.items():
        if r != layer.r or alpha != layer.alpha:
            layer.r, layer.alpha = r, alpha
            layer.scaling = scaling_of(alpha, r, layer.rslora)
    for p in biases.values():  # they are part of the adapter: they train, as under PEFT
        p.requires_grad_(True)
    if any(isinstance(m, LoRAMultiheadAttention) for m in layers.values()):
        warn_if_peft_doubles("load_adapter")
    renewed = []
    with torch.no_grad():
        for key, t in tensors.items():
            owner, attr = params[key]
            if attr is None:
                owner.copy_(t)
                continue
            cur = getattr(owner, attr)
            if cur.shape != t.shape:
                setattr(owner, attr, nn.Parameter(t.to(cur.device, cur.dtype), requires_grad=cur.requires_grad))
                renewed.append(key)
            else:
                cur.copy_(t)
    if renewed and not fresh:
        warnings.warn(
            f"load_adapter: the adapter's rank differs from the model's, so {len(renewed)} LoRA tensors (e.g."
            f" {renewed[0]}) are new Parameters: build the optimizer after loading",
            stacklevel=2,
        )
    return model


def _load_through_peft(model: nn.Module, path: str, builds: dict) -> nn.Module:
    """An adapter with which PEFT's loader changes the model (:func:`_peft_builds`: an init it runs again,
    layer_replication): PEFT loads it into ``model`` (rebuilding the base weights its A and B were trained
    against, or the repeated layers, exactly as PEFT would), then :func:`from_peft` converts it in place."""
    from peft import PeftModel

    if lora_modules(model):  # its bases may be rebuilt already, or not: which one is unknowable here
        shown = ", ".join(f"{k}={v!r}" for k, v in builds.items() if k in ("init_lora_weights", "layer_replication"))
        raise ValueError(
            f"load_adapter: the adapter has {shown}, with which PEFT's loader rebuilds the original model (PiSSA /"
            " OLoRA / CorDA / LoRA-GA change the base weights, MiCA freezes B, layer_replication repeats layers);"
            " load it into a model without LoRA layers"
        )
    peft = PeftModel.from_pretrained(model, path, is_trainable=True)
    return from_peft(peft)


def _wrap_tokens(model: nn.Module, cfg: dict) -> None:
    """Set up the adapter's trainable tokens (``trainable_token_indices``) with PEFT's own code (which
    also ties an lm_head sharing the embedding), unless the model holds them already; held ones must
    cover the same rows."""
    want = cfg.get("trainable_token_indices")
    if not want:
        return
    held = {name: idx for _, idx, name in _token_entries(model).values()}
    if held:
        listed = want if isinstance(want, dict) else None
        same = sorted(held.values()) == sorted(map(list, listed.values())) if listed else list(held.values()) == [want]
        if not same:
            raise ValueError(f"load_adapter: the model's trainable tokens {held} are not the adapter's {want}")
        return
    from peft import LoraConfig
    from peft.utils.other import set_additional_trainable_modules

    peft_cfg = LoraConfig(trainable_token_indices=want, ensure_weight_tying=bool(cfg.get("ensure_weight_tying")))
    model_cfg = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}
    set_additional_trainable_modules(model, peft_cfg, model_cfg, "default")


def _pattern(pattern: dict, name: str, default):
    """The value of the first ``rank_pattern`` / ``alpha_pattern`` key that matches a module name by PEFT's
    rule: the key is a regex for the name's tail after a dot (``layers\\.[0-3]\\.q_proj`` matches
    ``model.layers.2.q_proj``), or for the whole name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
