"""Keeping a LoRA layer's input for backward without keeping a copy of it: rebuild it in backward
from what the op that produced it keeps anyway.

The adapter gradient ``grad_A = (s g B)^T D(x)`` needs the layer's input x in backward, so a LoRA
layer holds x from forward to backward, while the frozen layer it replaces holds nothing (its input
gradient needs only W). On BERT-base that is 3 of every 4 inputs of the adapted layers: the GELU
output feeding ``output.dense`` (``[tokens, 3072]``) and the LayerNorm outputs feeding q/k/v and
``intermediate.dense``, about 75 MB a layer at 32 x 128 tokens in fp32, half the frozen model's
activations. When x is the output of an op whose own backward keeps enough to rebuild it, the
layer keeps those tensors instead (the very storages that op keeps: no extra memory) and rebuilds x
when its backward runs (before the producer's, which frees them):

==============  ================================  ======================================  ==============
producer        x                                 kept by the producer's backward         rebuilt x
==============  ================================  ======================================  ==============
GELU, SiLU      ``gelu(h)``, ``silu(h)``          h                                       bit-identical
product         ``a * b`` (SwiGLU's down input)   a and b, or an operand's own producer   bit-identical
ReLU            ``relu(h)``                       the result itself                       the same tensor
LayerNorm       ``(h - mean) rstd w + b``         h, mean, rstd, w, b (fp32/fp64 stats)   within 1-2 ulp
dtype cast      ``y.to(dtype)`` of one of these   what y's producer keeps                 as y's, cast
==============  ================================  ======================================  ==============

HF's RMSNorm, ``w * (h * rsqrt(mean(h^2) + eps)).to(dtype)``, is a product of w (kept) and a cast of
a product whose operands are kept: rebuilt bit-identical, the producers followed up to 4 deep.

Only the adapter gradient reads the rebuilt x, so a LayerNorm rebuild changes ``grad_A`` by rounding
only (as a different GEMM order would); outputs and every other gradient are unchanged. The cost is
the rebuild's passes over x in backward (one for GELU, ReLU and products, two for LayerNorm).

Not used under saved-tensor hooks (checkpointing and offloading manage saved tensors themselves) or
under ``torch.compile`` (its partitioner chooses what to recompute). Off globally with the
environment variable ``FTKERNELS_RECOMPUTE_INPUT=0`` or :func:`set_enabled`.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
from torch import Tensor

from .._ext import C, available

ENV = "FTKERNELS_RECOMPUTE_INPUT"
_enabled = os.environ.get(ENV, "1") != "0"
_STATS = (torch.float32, torch.float64)  # LayerNorm statistics precise enough to rebuild from


class Plan(NamedTuple):
    """How to rebuild x: the ``spec`` tree evaluated on ``tensors`` (what the producers keep).

    ``spec`` nodes: ``("t", i)`` is ``tensors[i]``; ``("gelu", child, approximate)``, ``("silu", child)``,
    ``("mul", left, right)``, ``("to", child, dtype)``, ``("layer_norm", h, mean, rstd, w, b)``
    (``w``/``b`` leaf specs or None)."""

    spec: tuple
    tensors: tuple[Tensor, ...]


def set_enabled(flag: bool) -> bool:
    """Turn input recomputation on or off for every LoRA layer call from now on; returns the
    previous setting."""
    global _enabled
    prev, _enabled = _enabled, bool(flag)
    return prev


def is_enabled() -> bool:
    """Whether LoRA layers rebuild their input in backward instead of saving it (see :func:`set_enabled`)."""
    return _enabled


@contextlib.contextmanager
def enabled(flag: bool):
    """``with enabled(False): ...``: the setting inside the block, restored after."""
    prev = set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(prev)


_MAX_DEPTH = 4  # producers followed back from x (RMSNorm's weight * (h * rstd).to(dtype) takes 3)


def plan(x: Tensor) -> Plan | None:
    """A :class:`Plan` that rebuilds x (same shape, dtype, device and values) from tensors its
    producers' backward nodes keep anyway, or None (no grad graph, another producer, a kept tensor
    modified in place since, recomputation off, saved-tensor hooks active, compiling)."""
    node = x.grad_fn
    if node is None or not _enabled or torch.compiler.is_compiling() or not available():
        return None  # (without the extension, which rebuilds, x is kept)
    if saved_tensor_hooks_active():
        return None
    tensors: list[Tensor] = []
    try:
        spec = _spec(node, x.output_nr, tensors, 0)
    except (RuntimeError, AttributeError):  # a kept tensor modified in place (autograd refuses to
        return None  # unpack it), or a torch whose node does not expose what is read here
    # The spec rebuilds the node's own output, x; the rebuild runs on x's device, where all it reads
    # must be. A kept tensor whose storage is already released (FSDP frees a unit's unsharded
    # parameters after its forward, e.g. the LayerNorm weight of the block before) cannot be read.
    if spec is None or any(t.device != x.device or not storage_ok(t) for t in tensors):
        return None
    return Plan(spec, tuple(tensors))


def kept_and_program(x: Tensor) -> tuple[list[Tensor], list[int]]:
    """What the C++ LoRA node takes to rebuild x in backward instead of keeping it: the plan's tensors
    and its encoded :func:`program`, or two empty lists (x is kept)."""
    p = plan(x)
    return ([], []) if p is None else (list(p.tensors), program(p.spec))


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (non-reentrant checkpointing, offloading) handle what autograd
    saves right now."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def storage_ok(t: Tensor) -> bool:
    """Whether t's storage still holds every element t addresses (sharded data-parallel wrappers
    resize the storage of gathered parameters to 0 between uses). The extension's check, which its
    rebuild makes again in backward."""
    return C().storage_ok(t)


def _leaf(t: Tensor | None, tensors: list[Tensor]) -> tuple | None:
    if t is None:
        return None
    tensors.append(t)
    return ("t", len(tensors) - 1)


def _operand(node, saved: Tensor | None, k: int, tensors: list[Tensor], depth: int) -> tuple | None:
    """Spec of operand k of ``node``: the tensor the node kept, else rebuilt from its own producer."""
    if saved is not None:
        return _leaf(saved, tensors)
    src, nr = node.next_functions[k]
    return None if src is None else _spec(src, nr, tensors, depth + 1)


def _spec(node, output_nr: int, tensors: list[Tensor], depth: int) -> tuple | None:
    """Spec of output ``output_nr`` of ``node`` (tensors it reads appended to ``tensors``), or None."""
    if depth >= _MAX_DEPTH:
        return None
    name = type(node).__name__
    if name == "GeluBackward0":  # gelu and silu keep their input, relu its result
        return ("gelu", _leaf(node._saved_self, tensors), node._saved_approximate)
    if name == "SiluBackward0":
        return ("silu", _leaf(node._saved_self, tensors))
    if name == "ReluBackward0":
        return _leaf(node._saved_result, tensors)
    if name == "MulBackward0":  # a * b keeps each operand when the other needs grad
        a = _operand(node, node._saved_self, 0, tensors, depth)
        b = None if a is None else _operand(node, node._saved_other, 1, tensors, depth)
        # a 0-dim operand may be a wrapped Python scalar, which promotes differently: not rebuilt
        if b is None or any(tensors[c[1]].dim() == 0 for c in (a, b) if c[0] == "t"):
            return None
        return ("mul", a, b)
    if name == "ToCopyBackward0":  # a dtype cast (not a device move: the rebuild would copy across)
        src, nr = node.next_functions[0]
        out, inp = _out_meta(node, 0), None if src is None else _out_meta(src, nr)
        if out is None or inp is None or out.device != inp.device or out.dtype not in _SCALAR_TYPES:
            return None
        child = _spec(src, nr, tensors, depth + 1)
        return None if child is None else ("to", child, out.dtype)
    if name == "NativeLayerNormBackward0" and output_nr == 0:
        mean, rstd = node._saved_result1, node._saved_result2
        if mean.dtype not in _STATS:  # CPU keeps bf16/fp16 statistics for bf16/fp16 inputs: too coarse
            return None
        return (
            "layer_norm", _leaf(node._saved_input, tensors), _leaf(mean, tensors), _leaf(rstd, tensors),
            _leaf(node._saved_weight, tensors), _leaf(node._saved_bias, tensors),
        )  # fmt: skip
    return None


def _out_meta(node, output_nr: int):
    """Shape, dtype and device of a node's forward output (its backward input), or None where this
    torch does not expose them."""
    meta = getattr(node, "_input_metadata", None)
    return meta[output_nr] if meta is not None and output_nr < len(meta) else None


def rebuild(p: Plan) -> Tensor:
    """x from its :class:`Plan`, autograd and autocast off (the producers ran in the dtypes kept;
    the result is only read by the adapter gradient). Evaluated by the extension's
    ``rebuild_input`` (csrc/autograd/input_recompute.cpp), which the C++ LoRA node calls too: one
    implementation, the same bits from either node. Raises when a kept tensor's storage was released."""
    if p.spec[0] == "t":  # the producer kept x itself (ReLU)
        return p.tensors[p.spec[1]].detach()
    return C().rebuild_input(program(p.spec), list(p.tensors))


# Opcodes of the postfix program (csrc/include/ftk/autograd_host.h, namespace rebuild_op).
_T, _GELU, _SILU, _MUL, _TO, _LN = range(6)
_GELU_APPROX = {"none": 0, "tanh": 1}
_programs: dict[tuple, list[int]] = {}


def program(spec: tuple) -> list[int]:
    """``spec`` as the extension's postfix program (a list of ints; cached per spec: a model has a
    handful of distinct ones)."""
    prog = _programs.get(spec)
    if prog is None:
        prog = _programs[spec] = []
        _encode(spec, prog)
    return prog


def _encode(spec: tuple, out: list[int]) -> None:
    op = spec[0]
    if op == "t":
        out += (_T, spec[1])
    elif op == "gelu":
        _encode(spec[1], out)
        out += (_GELU, _GELU_APPROX[spec[2]])
    elif op == "silu":
        _encode(spec[1], out)
        out.append(_SILU)
    elif op == "mul":
        _encode(spec[1], out)
        _encode(spec[2], out)
        out.append(_MUL)
    elif op == "to":
        _encode(spec[1], out)
        out += (_TO, _SCALAR_TYPES[spec[2]])
    elif op == "layer_norm":
        for c in spec[1:6]:
            if c is not None:
                _encode(c, out)
        out += (_LN, int(spec[4] is not None), int(spec[5] is not None))
    else:
        raise ValueError(f"input_recompute: unknown plan node {op!r}")


# c10::ScalarType numbers of the dtypes a rebuilt input can have (c10/core/ScalarType.h)
_SCALAR_TYPES = {torch.float16: 5, torch.float32: 6, torch.float64: 7, torch.bfloat16: 15}
