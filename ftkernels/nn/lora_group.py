"""Shared-input grouping of fused LoRA Linear layers: the q/k/v projections of an attention block (or
gate/up of a gated MLP) read the same x, and run as one autograd node
(:class:`ftkernels.ops.lora_group.LoRAGroupFunction`) with no change to the model's code.

How: sibling :class:`LoRALinear` layers (same parent, same in_features) form a candidate group. The
group watches which of them are called back to back on the very same tensor (same object, same
version); once it has seen such a run, the run's first layer (the leader), called on x, computes every
run member's output in one node, and each later member, called on that same x, returns its output
ready-made. Anything else (another x, an in-place change of x or of an adapter, a member called
twice, grad mode or train/eval switched, a merged member, ``torch.compile`` tracing) is a miss: the
waiting outputs are dropped, the group relearns, and every layer runs on its own, so results never
depend on the grouping. Ready-made outputs are the tensors the member would have produced (same
kernels, same dropout stream per member), so only host time and memory passes change.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import Tensor, nn

from ..ops import lora_group as _ops
from ..ops import torch_func
from ..ops.input_recompute import saved_tensor_hooks_active
from ..ops.lora_linear import _as
from .lora_linear import _FLOATS, _compute_dtype, call_seed

ENV = "FTKERNELS_LORA_GROUP"  # "0" turns grouping off for layers grouped later
_MAX_MISSES = 8  # a group that keeps missing (layers never share x after all) stops trying


def _dead():
    return None


class LoRAGroup:
    """A candidate group: sibling LoRA Linear layers that may share their input (see the module docstring).
    Not an ``nn.Module``: it owns no parameters and adds nothing to state dicts."""

    def __init__(self, members: list[nn.Module]):
        self.members = list(members)
        self.order: list[int] | None = None  # learned run (member indices, call order), None while learning
        self.misses = 0
        self._run: list[int] = []  # learning: members called so far on the tensor in _run_x
        self._run_x = None  # weakref of that tensor
        self._run_version = -1
        self._pending: dict[int, tuple] = {}  # member index -> (output waiting for its call, _state)
        self._x = _dead  # weakref of the leader's x

    # -- state that must not travel (deepcopy, pickling): outputs with graphs, weakrefs
    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_run=[], _run_x=None, _run_version=-1, _pending={}, _x=_dead)
        return state

    def __call__(self, member: nn.Module, x: Tensor) -> Tensor:
        """``member``'s output ``[..., out]`` for x ``[..., in]``. Once the members' call order is learned, the
        first of them runs every member's LoRA on x in one node and the others get their waiting outputs
        (if x and their adapters are unchanged); otherwise each member runs alone."""
        if saved_tensor_hooks_active() or not isinstance(x, Tensor) or x.is_inference() or torch_func.active():
            # Non-reentrant checkpointing (or offloading) matches the tensors saved by a forward with
            # those of its recompute one by one: a group fusing in one and not the other would break
            # that, so under such hooks every layer runs alone and the group changes nothing.
            # Inference tensors have no version counter to check a waiting output against. A torch.func
            # transform runs each layer in plain ops (ftkernels/ops/torch_func.py).
            return member._forward_alone(x)
        i = self.members.index(member)
        if self._pending:
            entry = self._pending.pop(i, None)
            if entry is not None and entry[1] == self._state(member, x) and self._x() is x:
                return entry[0]
            self._miss()  # someone else's x, or a change since the leader ran
        if self.order is not None and i == self.order[0]:
            y = self._run_group(x)
            if y is not None:
                return y
        self._observe(i, x)
        return member._forward_alone(x)

    @staticmethod
    def _state(m: nn.Module, x: Tensor) -> tuple:
        """What a waiting output depends on besides x's identity and the frozen base: x's version,
        grad mode, the member's mode and its adapters' versions (read from ``_parameters``: cheaper
        than module attribute lookup; a LoRA bias's too)."""
        p = m._parameters
        lb = p.get("lora_bias")
        return (
            x._version,
            torch.is_grad_enabled(),
            m.training,
            p["lora_A"]._version,
            p["lora_B"]._version,
            None if lb is None else lb._version,
        )

    def _miss(self) -> None:
        self._pending = {}
        self.order = None
        self.misses += 1

    def _observe(self, i: int, x: Tensor) -> None:
        """Learning: extend the current run when x is the run's tensor, else close it (a run of two
        or more distinct members becomes the order) and start a new one."""
        if self.misses >= _MAX_MISSES:
            return
        same = self._run_x is not None and self._run_x() is x and x._version == self._run_version
        if same and i not in self._run:
            self._run.append(i)
            if len(self._run) == len(self.members) and self.order is None:
                self.order = list(self._run)  # every member joined: the run is complete already
            return
        if len(self._run) >= 2 and self.order is None:
            self.order = self._run
        self._run, self._run_x, self._run_version = [i], weakref.ref(x), x._version

    def _run_group(self, x: Tensor) -> Tensor | None:
        """The leader's call: every run member's output in one node, or None when the run cannot be
        fused on this x (then everyone runs alone)."""
        run = [self.members[j] for j in self.order]
        if x.dtype not in _FLOATS:
            return None
        weights = [m.linear_weight() for m in run]
        w0 = weights[0]
        for m, w in zip(run, weights):
            if m.merged or w.device != x.device or w.dtype != w0.dtype or w.shape[1] != x.shape[-1]:
                return None
            if type(w).__name__ == "DTensor":  # sharded per layer: the weights exist only in each call
                return None
        dtype = _compute_dtype(x, w0, "LoRALinear")
        if x.device.type == "cuda" and dtype == torch.float64:
            return None  # the layer's own call raises the proper error
        ps = tuple(float(m.dropout) if m.training else 0.0 for m in run)
        # One draw per member with dropout, in call order: the generator advances exactly as when the
        # layers run alone, so grouping never changes a mask (checkpoint recomputes stay exact).
        seeds = [call_seed(p, x.device) for p in ps]
        members = [
            (_as(w, dtype), _as(m._bias_with_lora(m.base.bias), dtype), m.lora_A, m.lora_B, s)
            for m, w, s in zip(run, weights, seeds)
        ]
        ys = _ops.lora_group_ys(_as(x, dtype), members, tuple(m.scaling for m in run), ps)
        self._pending = {j: (y, self._state(m, x)) for j, m, y in zip(self.order[1:], run[1:], ys[1:])}
        self._x = weakref.ref(x)
        return ys[0]


def _enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def group_shared_inputs(model: nn.Module) -> list[LoRAGroup]:
    """Make every set of sibling :class:`LoRALinear` layers (direct children of one module, same
    in_features) a candidate shared-input group; returns the groups. Nothing changes numerically:
    a group fuses only the layers it sees called on the same tensor, and falls back on any
    mismatch. Off when the environment sets ``FTKERNELS_LORA_GROUP=0``. Called by
    :func:`ftkernels.apply_lora` and :func:`ftkernels.from_peft`."""
    from .lora_linear import LoRALinear

    ungroup(model)
    if not _enabled():
        return []
    groups = []
    for parent in model.modules():
        by_k: dict[int, list[nn.Module]] = {}
        for child in parent.children():
            # (DoRA scales each layer's output, and a quantized base runs itself: alone)
            if isinstance(child, LoRALinear) and child._fused_base and not child.dora:
                by_k.setdefault(child.in_features, []).append(child)
        for members in by_k.values():
            if len(members) >= 2:
                g = LoRAGroup(members)
                for m in members:
                    m._lora_group = g
                groups.append(g)
    return groups


def ungroup(model: nn.Module) -> None:
    """Remove every shared-input group from ``model``'s LoRA layers (each runs alone again)."""
    for m in model.modules():
        if getattr(m, "_lora_group", None) is not None:
            m._lora_group = None
