"""Base class of the fused optimizers: one compiled kernel pass per param group and device.

Per element, in one read and one write of each tensor (math in ``csrc/include/ftk/optimizer.h``):

1. ``g <- g / grad_scale * clip`` (AMP unscale; ``clip = min(1, max_grad_norm / (||g||_2 + 1e-6))``
   with the global norm of all grads this optimizer steps), negated when ``maximize``;
2. ``g <- g * Bernoulli(1-p) / (1-p)`` when ``grad_dropout=p`` (Child-Tuning-F; Philox4x32-10 keyed
   by a seed drawn from torch's default generator each step, counter = (element // 8, the param's
   index in the optimizer); 16-bit draws, so p is resolved to 2^-16; nothing stored; CPU and CUDA
   draw the same masks; for DTensor params the element index is the local shard's);
3. ``g <- g + l2 p + (l2sp + ewc F) (p - anchor)`` (coupled penalties; ``anchor`` = the weights at
   construction or given, ``F`` = a Fisher diagonal);
4. the optimizer's own rule (AdamW, SGD, Adagrad, RMSprop as in ``torch.optim``);
5. ``p <- sign(p) max(|p| - lr l1, 0)`` (proximal L1: weights reach exactly 0).

torch.optim's switches ``foreach``, ``fused`` and ``capturable`` are accepted (so code written for
torch's optimizers runs unchanged) and ignored: the step is always this one pass, without host syncs.
``differentiable=True`` raises.

Elements masked out with :func:`ftkernels.set_grad_mask` are skipped: value and state unchanged.
A param whose mask keeps less than ``compact_threshold`` (0.5) of it keeps state for its kept
elements only (``ftkernels/optim/_compact.py``); set ``opt.compact_threshold = 0`` to keep it dense.
Dropped-out elements still see moment decay and weight decay. With AMP (``GradScaler``) an inf/NaN
gradient skips the whole step on the device, without a host sync; a non-finite gradient norm
(with ``max_grad_norm``) does the same.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch.optim import Optimizer

from .. import _ext
from ..masks import mask_version, packed_grad_mask
from ..nn.lora_linear import draw_seed
from . import _compact

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()

KINDS = {"adamw": 0, "sgd": 1, "adagrad": 2, "rmsprop": 3}
# torch.optim state names, in the kernel's s1, s2, s3 slots.
STATE_SLOTS = {
    "adamw": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "sgd": ("momentum_buffer", None, None),
    "adagrad": ("sum", None, None),
    "rmsprop": ("square_avg", "momentum_buffer", "grad_avg"),
}
REGULARIZER_DEFAULTS = dict(
    l1=0.0, l2=0.0, l2sp=0.0, ewc=0.0, grad_dropout=0.0, max_grad_norm=None, master_weights=False
)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


_NOT_GROUP_OPTIONS = ("self", "params", "anchors", "fisher", "anchor_dtype", "__class__")
# torch.optim's implementation switches: taken so that code written for torch's optimizers runs, kept
# out of the param groups (they choose nothing here).
_TORCH_SWITCHES = ("foreach", "fused", "capturable", "differentiable")


def group_defaults(init_args: dict) -> dict:
    """An optimizer's param-group defaults: its ``__init__`` arguments (``locals()``) minus the
    ones that are not per-group options."""
    if init_args.get("differentiable"):
        raise NotImplementedError(
            f"{type(init_args['self']).__name__}: differentiable=True is not supported (the fused step runs outside"
            " autograd); use torch.optim for higher-order optimization"
        )
    return {k: v for k, v in init_args.items() if k not in _NOT_GROUP_OPTIONS and k not in _TORCH_SWITCHES}


def group_option_names(cls) -> frozenset:
    """The per-group options ``cls.__init__`` declares: what a saved param group must carry. Not
    ``self.defaults``, which torch's ``Optimizer.__setstate__`` extends (``differentiable``) whenever
    an optimizer is copied or unpickled (``copy.deepcopy``, Accelerate's ``prepare``)."""
    return frozenset(inspect.signature(cls.__init__).parameters) - frozenset(_NOT_GROUP_OPTIONS + _TORCH_SWITCHES)


def _local(t):
    """The local shard of a DTensor (a view: in-place updates reach the DTensor), else ``t``."""
    return t.to_local() if DTensor and isinstance(t, DTensor) else t


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """``||g||_2`` over all ``grads`` (the norm ``clip_grad_norm_`` clips by), a float32 0-dim tensor.

    Dense fp32/fp64 CPU grads go through BLAS dot products (about 2x faster there than
    ``vector_norm``); everything else (GPU, DTensor, low precision) through
    ``torch.nn.utils.get_total_norm``, which stays on the device without a host sync.
    """
    if all(
        type(g) is torch.Tensor and g.device.type == "cpu" and g.dtype in (torch.float32, torch.float64) for g in grads
    ):
        sq = math.fsum(float(torch.dot(g.reshape(-1), g.reshape(-1))) for g in grads)
        return torch.tensor(math.sqrt(sq), dtype=torch.float32)
    norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    if DTensor and isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.float()


class FusedOptimizer(Optimizer):
    """Shared machinery; use :class:`FusedAdamW`, :class:`FusedSGD`, :class:`FusedAdagrad` or
    :class:`FusedRMSprop`.

    Extra constructor arguments shared by all of them:
      anchors: optional ``{param: tensor}`` pull targets for ``l2sp``/``ewc`` (default: a copy of
        each param at construction, or when its group is added).
      fisher: ``{param: tensor}`` Fisher diagonals, required for every param of a group with
        ``ewc > 0`` (see :func:`ftkernels.fisher_diagonal`).
      anchor_dtype: dtype to keep anchors and Fisher in (e.g. ``torch.bfloat16`` to halve bytes);
        default: the param's dtype.
    """

    kind: str = ""
    # Masks keeping less than this fraction of a param get compact state (see _compact.py).
    compact_threshold: float = 0.5
    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf

    def __init__(self, params, defaults, anchors=None, fisher=None, anchor_dtype=None):
        self._anchors_in = dict(anchors) if anchors else {}
        self._fisher_in = dict(fisher) if fisher else {}
        self._anchor_dtype = anchor_dtype
        super().__init__(params, defaults)
        self._anchors_in, self._fisher_in = {}, {}  # held in state from here on

    # ----------------------------------------------------------------- validation and set-up
    def _param_name(self, group, i, p) -> str:
        names = group.get("param_names")
        if names is not None and i < len(names):
            return repr(names[i])
        gi = next((k for k, g in enumerate(self.param_groups) if g is group), len(self.param_groups))
        return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"

    def _check_group(self, group) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"{type(self).__name__}: {msg}")

        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            need(lr.numel() == 1, f"a tensor lr must have one element, got shape {tuple(lr.shape)}")
        else:
            need(math.isfinite(lr) and lr >= 0, f"lr must be a finite number >= 0, got {lr}")
        for key in ("l1", "l2", "l2sp", "ewc", "weight_decay"):
            v = group.get(key, 0.0)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, f"{key} must be >= 0, got {v}")
        p = group["grad_dropout"]
        need(isinstance(p, (int, float)) and 0 <= p < 1, f"grad_dropout must be in [0, 1), got {p}")
        mgn = group["max_grad_norm"]
        need(mgn is None or (math.isfinite(mgn) and mgn > 0), f"max_grad_norm must be None or > 0, got {mgn}")
        for i, prm in enumerate(group["params"]):
            if not prm.is_floating_point():
                raise ValueError(
                    f"{type(self).__name__}: param {self._param_name(group, i, prm)} is not floating point"
                )
        self._check_kind(group, need)

    def _check_kind(self, group, need) -> None:
        """Per-optimizer hyper-parameter checks (overridden)."""

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._invalidate_plans()
        group = self.param_groups[-1]
        self._check_group(group)
        if group["l2sp"] or group["ewc"]:
            for i, p in enumerate(group["params"]):
                self._init_anchor(group, i, p)

    def _init_anchor(self, group, i, p) -> None:
        st = self.state[p]
        name = self._param_name(group, i, p)
        dtype = self._anchor_dtype or p.dtype
        if "anchor" not in st:
            src = self._anchors_in.get(p, p)
            self._check_like(src, p, f"anchor of {name}")
            st["anchor"] = src.detach().to(dtype=dtype, copy=True)
        if group["ewc"] and "fisher" not in st:
            if p not in self._fisher_in:
                raise ValueError(
                    f"{type(self).__name__}: ewc > 0 needs a Fisher diagonal for {name}: pass "
                    "fisher={param: tensor} (ftkernels.fisher_diagonal computes one)"
                )
            f = self._fisher_in[p]
            self._check_like(f, p, f"Fisher diagonal of {name}")
            if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
                raise ValueError(f"{type(self).__name__}: the Fisher diagonal of {name} must be finite and >= 0")
            st["fisher"] = f.detach().to(dtype=dtype, copy=True)

    def _check_like(self, t, p, what) -> None:
        if not isinstance(t, torch.Tensor) or t.shape != p.shape or t.device != p.device:
            got = f"shape {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{type(self).__name__}: {what} must be a tensor of shape {tuple(p.shape)} on {p.device}, got {got}"
            )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in {**REGULARIZER_DEFAULTS, **self._kind_defaults()}.items():
                group.setdefault(k, v)

    def _kind_defaults(self) -> dict:
        return {}

    def _state_keys(self, group) -> tuple:
        """Which of the kind's state slots this group uses (None: slot unused)."""
        return STATE_SLOTS[self.kind]

    def _init_state(self, group, p) -> None:
        st = self.state[p]
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
        master = group["master_weights"] and p.dtype in _LOW_PRECISION
        if master and "master" not in st:
            st["master"] = p.detach().to(torch.float32, copy=True)
        sdt = torch.float32 if master else p.dtype
        keys = [k for k in self._state_keys(group) if k is not None]
        plain = type(p) in (torch.Tensor, torch.nn.Parameter)
        idx = _compact.wanted_index(p, group, self.compact_threshold, plain)

        def initial(key, template, dtype):
            return self._initial_state(key, group, template, dtype)

        _compact.relayout(st, keys, p, idx, initial)
        template = p if idx is None else p.new_empty(idx.numel())
        for key in keys:
            if key not in st:
                st[key] = self._initial_state(key, group, template, sdt)

    def _initial_state(self, key, group, p, dtype) -> torch.Tensor:
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    # ----------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but keeps the saved dtype of each state
        tensor (fp32 master weights and moments of bf16 params, bf16 anchors, int32 compact-state
        indices) instead of casting it to the param's dtype, and keeps ``step`` as a float32 tensor
        on the param's device. Compact and dense state load into either layout (converted at the
        next step). A state without ``step`` (torch.optim.SGD's momentum buffers) counts as past the
        first step. Param groups saved by another optimizer (an SGD state dict has no ``betas``) or
        with invalid hyper-parameters raise before anything is replaced."""
        self._check_saved_groups(state_dict)
        super().load_state_dict(state_dict)
        self._invalidate_plans()
        saved = state_dict["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, p in enumerate(params):
            src = saved.get(idx)
            if src is None or p not in self.state:
                continue
            st = self.state[p]
            if "step" not in src and any(isinstance(v, torch.Tensor) for v in src.values()):
                # torch.optim.SGD keeps no step: a saved momentum buffer means a step was taken, and
                # step 0 would make the next one restart the buffer from the gradient.
                st["step"] = torch.ones((), dtype=torch.float32, device=_local(p).device)
            for k, v in src.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if k == "step":
                    st[k] = v.detach().to(device=_local(p).device, dtype=torch.float32, copy=True).reshape(())
                elif st[k].dtype != v.dtype:  # torch casts every tensor (compact indices too) to p's dtype
                    st[k] = v.detach().to(device=p.device, dtype=v.dtype, copy=True)

    def _check_saved_groups(self, state_dict: dict) -> None:
        saved = state_dict.get("param_groups")
        if not isinstance(saved, list) or len(saved) != len(self.param_groups):
            return  # torch's own load_state_dict names this mismatch
        filled = {**REGULARIZER_DEFAULTS, **self._kind_defaults()}
        for gi, (g, cur) in enumerate(zip(saved, self.param_groups)):
            missing = sorted(k for k in group_option_names(type(self)) if k not in g and k not in filled)
            if missing:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: saved param group {gi} lacks {missing}: was it saved"
                    " by another optimizer?"
                )
            if len(g.get("params", ())) == len(cur["params"]):
                self._check_group({**filled, **g, "params": cur["params"]})

    # ----------------------------------------------------------------- the step
    def _hyper(self, group):
        h = _ext.C().OptimHyper()
        h.kind = KINDS[self.kind]
        lr = group["lr"]
        h.lr = float(lr) if not isinstance(lr, torch.Tensor) else 0.0
        for k in ("l1", "l2", "l2sp", "ewc", "grad_dropout"):
            setattr(h, k, float(group[k]))
        h.max_grad_norm = float(group["max_grad_norm"] or 0.0)
        self._fill_hyper(h, group)
        return h

    def _fill_hyper(self, h, group) -> None:
        """Copy the kind's hyper-parameters from ``group`` into ``h`` (overridden)."""

    def _invalidate_plans(self) -> None:
        self.__dict__["_plans"] = {}

    @torch.no_grad()
    def step(self, closure=None):
        """One fused step over every param with a gradient. ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        C = _ext.C()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)

        work = []  # (group, [(param, index in group, stable tensor id)])
        tid = 0
        for group in self.param_groups:
            items = []
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    items.append((p, i, tid))
                tid += 1
            if items:
                work.append((group, items))
        if not work:
            return loss

        total_norm = None
        if any(g["max_grad_norm"] for g, _ in work):
            total_norm = global_grad_norm([p.grad for _, items in work for p, _, _ in items])
            if grad_scale is not None:
                total_norm = total_norm / grad_scale.to(total_norm.device)
        seed = 0
        if any(g["grad_dropout"] for g, _ in work):
            seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64))

        for gi, (group, items) in enumerate(work):
            for plan in self._plans_for(C, gi, group, items):
                self._run_plan(C, plan, group, grad_scale, found_inf, total_norm, seed)
        return loss

    def _plans_for(self, C, gi, group, items):
        """Cached per (group, device) argument bundles: everything but the grads and the per-step
        scalars is built once and reused while the params with grads, masks and state stay put."""
        plans = self.__dict__.setdefault("_plans", {})
        key = (gi, tuple(id(p) for p, _, _ in items), mask_version())
        hit = plans.get(key)
        if hit is not None and hit[0] is group:
            return hit[1]
        by_device: dict[torch.device, list] = {}
        for p, i, t in items:
            if p.grad.is_sparse:
                raise ValueError(
                    f"{type(self).__name__}: sparse gradients are not supported ({self._param_name(group, i, p)})"
                )
            self._init_state(group, p)
            by_device.setdefault(_local(p).device, []).append((p, i, t))
        built = [self._build_plan(C, group, device, entries) for device, entries in by_device.items()]
        if len(plans) > 64:  # params with grads keep changing (e.g. progressive unfreezing)
            plans.clear()
        plans[key] = (group, built)
        return built

    def _build_plan(self, C, group, device, entries):
        if device.type != "cpu":
            _ext.require_device("fused_optim_step", device)
        keys = self._state_keys(group)
        use_reg = bool(group["l2sp"] or group["ewc"])
        a = C.OptimArgs()
        params, steps, ids, s = [], [], [], ([], [], [])
        masks, anchors, fishers, masters = [], [], [], []
        indices = []  # compact state: the kept elements' flat indices, which the kernel steps through
        for p, _i, t in entries:
            st = self.state[p]
            idx = st.get(_compact.INDEX_KEY)
            indices.append(idx)
            params.append(_local(p))
            steps.append(st["step"])
            ids.append(t)
            for slot, key in zip(s, keys):
                slot.append(_local(st[key]) if key is not None and key in st else None)
            masks.append(None if idx is not None else packed_grad_mask(p))
            anchors.append(_local(st["anchor"]) if use_reg else None)
            fishers.append(_local(st["fisher"]) if group["ewc"] else None)
            masters.append(_local(st["master"]) if "master" in st else None)
        a.params, a.steps, a.tensor_ids = params, steps, ids
        a.s1, a.s2, a.s3 = s
        a.masks, a.anchors, a.fishers, a.masters = masks, anchors, fishers, masters
        a.indices = indices
        return dict(args=a, device=device, entries=entries, params=params, hyper_key=None)

    def _run_plan(self, C, plan, group, grad_scale, found_inf, total_norm, seed):
        device = plan["device"]

        def on_dev(t):
            return None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())

        grads = []
        for (p, i, _t), lp in zip(plan["entries"], plan["params"]):
            g = _local(p.grad)
            if g.dtype != lp.dtype:
                raise ValueError(
                    f"{type(self).__name__}: grad dtype {g.dtype} differs from param dtype {lp.dtype} "
                    f"({self._param_name(group, i, p)})"
                )
            if g.stride() != lp.stride():  # rare: a grad laid out unlike its param; copy it once
                g = torch.empty_like(lp).copy_(g)
            grads.append(g)
        a = plan["args"]
        a.grads = grads
        lr = group["lr"]
        hyper_key = tuple(v for k, v in group.items() if k not in ("params", "param_names", "lr")) + (
            None if isinstance(lr, torch.Tensor) else lr,
        )
        if plan["hyper_key"] != hyper_key:  # rebuilt only when a hyper-parameter changed
            a.hyper = self._hyper(group)
            plan["hyper_key"] = hyper_key
        a.lr = on_dev(lr) if isinstance(lr, torch.Tensor) else None
        a.grad_scale = on_dev(grad_scale)
        skip = on_dev(found_inf)
        if total_norm is not None:
            norm = on_dev(total_norm)
            bad = (~torch.isfinite(norm)).float()
            skip = bad if skip is None else skip + bad
            a.total_norm = norm
        else:
            a.total_norm = None
        a.skip = skip
        a.seed = seed
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        # Under CUDA-graph capture the host seed would be replayed frozen (one dropout mask for every
        # replay): draw it on the device instead, which the graph redraws at each replay.
        draw = capturing and group["grad_dropout"] > 0
        a.seed_tensor = draw_seed(device) if draw else None
        keep = C.fused_optim_step(a)  # advances each param's step count unless skipped
        if keep:  # buffers the captured graph re-reads at each replay: alive as long as this optimizer
            self.__dict__.setdefault("_graph_buffers", []).extend(keep)
        # The kernel writes through raw pointers; tell autograd, as torch's in-place ops do (a graph
        # still holding a param then fails its version check instead of using the new value).
        torch.autograd.graph.increment_version(plan["params"])
