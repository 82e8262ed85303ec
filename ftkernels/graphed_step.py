"""A whole training step (forward, backward, optimizer) captured once in a CUDA graph and replayed:
:func:`graphed_train_step`.

Why: a LoRA step on a GPU is host-bound in eager mode (Python and one launch per small op: on the
H100 machine of bench/NOTES.md our BERT-base step took 79.7 ms eager for 48.9 ms of GPU work). A
replay is one launch for the whole step, so the step runs at the speed of its kernels. The e2e
benchmark's graphed rows are this class.

What a call does, in order (the same on every path, so results never depend on whether a graph ran):
``zero_grad(set_to_none=True)``; ``loss = loss_fn(model, batch)``; ``loss.backward()``;
``optimizer.step()``; returns ``loss`` (detached). With a ``grad_scaler`` (fp16 AMP) the middle is
``scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update()``: with ftkernels' fused
optimizers (and torch's fused ones) that sequence never syncs with the host, so it is captured too.

- The first ``warmup`` calls run eagerly on a side stream: they are real training steps on the
  batches given, and they let Triton compile and autotune, cuBLAS set up, the optimizer create its
  state and LoRA groups learn their layers, all outside the capture.
- The next call copies its batch into static buffers on the model's device, captures the step
  reading them, and replays it. Later calls copy their batch in and replay.
- A batch unlike the captured one (another shape, dtype, structure, or non-tensor value; the last,
  smaller batch of an epoch) runs that call eagerly, with a warning; the graph stays for the next.
- Learning rates may change between calls (schedulers, or assigning ``group["lr"]``): the graph
  reads each group's lr from a device tensor that every call refreshes. A change the graph cannot
  follow (another hyper-parameter, ``load_state_dict`` of the optimizer, a parameter given new
  storage, train/eval switched, param groups added) re-captures it; when that happens again and
  again (e.g. ``OneCycleLR`` cycling momentum every step) the step goes eager for good, with a
  warning.
- On CPU (or any non-CUDA model) every call is eager, with the same semantics.

Not covered: a ``GradScaler`` with an optimizer that does not take the scale itself (torch's
non-fused optimizers: ``scaler.step`` reads found_inf on the host, so the capture fails and the step
stays eager, warned), DDP/FSDP (their communication hooks need their own graph recipe), work between
backward and the optimizer step (use the fused optimizers' ``max_grad_norm`` for clipping), and
changes to the model's code path after capture (``merge_lora``, swapping layers, new gradient
masks), which no check sees: call :meth:`GraphedTrainStep.reset` after those.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from .ops.lora_linear import graph_routing

_FREQUENT = 2  # a re-capture fewer than this many replays after the last one counts as frequent
_MAX_FREQUENT = 3  # that many frequent re-captures: the step goes eager for good
_DYNAMIC = ("params", "lr")  # param-group entries a replay follows (lr through a device tensor)


def _graph_device(model: nn.Module, optimizer) -> torch.device | None:
    """The one CUDA device holding what the step trains (the optimizer's params, else the model's),
    or None when a graph cannot be used (CPU, no params, several devices)."""
    if optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
    else:
        params = list(model.parameters())
    devices = {p.device for p in params}
    if len(devices) != 1:
        return None
    (dev,) = devices
    return dev if dev.type == "cuda" else None


def _map_tensors(batch, fn):
    """``batch`` (tensors in mappings, lists and tuples, other values kept as they are) with new
    containers of the same types and ``fn(t)`` for each tensor t."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return _rebuild(batch, {k: _map_tensors(v, fn) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return _rebuild(batch, [_map_tensors(v, fn) for v in batch])
    return batch


def on_side_stream(fn: Callable, device: torch.device):
    """``fn()`` on a new side stream of ``device``, then the current stream waits for it; returns what
    fn returns. PyTorch's recipe for the steps before a CUDA-graph capture: lazy set-up (Triton
    compiling and autotuning, cuBLAS workspaces, allocations) stays off the stream the capture uses."""
    here = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(here)
    with torch.cuda.stream(side):
        out = fn()
    here.wait_stream(side)
    return out


def _to_static(batch, device: torch.device):
    """A copy of ``batch`` whose tensors are new buffers on ``device``: what the graph reads."""
    return _map_tensors(batch, lambda t: torch.empty(t.shape, dtype=t.dtype, device=device).copy_(t))


def _shallow(batch):
    """``batch`` with new containers around the same tensors: ``loss_fn`` may pop or add keys in what it
    is given without changing the static structure later batches are checked against."""
    return _map_tensors(batch, lambda t: t)


def _rebuild(like, items):
    """``items`` in the container type of ``like`` (dict-like, list, tuple, namedtuple); a plain dict or
    list when that type cannot be built from them."""
    kind = type(like)
    try:
        if isinstance(like, Mapping):
            return kind(items)
        if isinstance(like, tuple) and hasattr(like, "_fields"):
            return kind(*items)
        return kind(items)
    except Exception:
        return dict(items) if isinstance(like, Mapping) else list(items)


def _fill(dst, src, path: str) -> str | None:
    """Copy ``src`` into the static ``dst`` of the same structure; the first difference as text (then
    the call runs eagerly), None when everything matched and was copied."""
    if isinstance(dst, Tensor):
        if not isinstance(src, Tensor):
            return f"{path}: a {type(src).__name__} where a tensor was captured"
        if src.shape != dst.shape or src.dtype != dst.dtype:
            return f"{path}: {tuple(src.shape)} {src.dtype}, captured {tuple(dst.shape)} {dst.dtype}"
        if src is not dst:
            dst.copy_(src, non_blocking=True)
        return None
    if isinstance(dst, Mapping):
        if not isinstance(src, Mapping) or list(src.keys()) != list(dst.keys()):
            got = list(src.keys()) if isinstance(src, Mapping) else type(src).__name__
            return f"{path}: keys {got}, captured {list(dst.keys())}"
        for k in dst:
            why = _fill(dst[k], src[k], f"{path}[{k!r}]")
            if why:
                return why
        return None
    if isinstance(dst, (list, tuple)):
        if type(src) is not type(dst) or len(src) != len(dst):
            got = f"{type(src).__name__} of {len(src)}" if isinstance(src, (list, tuple)) else type(src).__name__
            return f"{path}: {got}, captured {type(dst).__name__} of {len(dst)}"
        for i, (d, s) in enumerate(zip(dst, src)):
            why = _fill(d, s, f"{path}[{i}]")
            if why:
                return why
        return None
    try:
        same = src is dst or bool(src == dst)
    except Exception:  # an array-like without a truth value: only the very object counts as equal
        same = False
    return None if same else f"{path}: {src!r}, captured {dst!r}"


def _hyper_id(v):
    """A comparable stand-in for one param-group value (tensors by identity: their values may change
    in place, which a graph follows)."""
    if isinstance(v, Tensor):
        return ("tensor", id(v))
    if isinstance(v, (list, tuple)):
        return tuple(_hyper_id(x) for x in v)
    return v


class GraphedTrainStep:
    """See :func:`graphed_train_step` (and the module docstring). Attributes: ``graphed`` (a graph is
    captured and in use), ``stats`` (calls run eagerly, replays, captures)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer,
        loss_fn: Callable,
        *,
        warmup: int = 3,
        enabled: bool | None = None,
        grad_scaler=None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"graphed_train_step: model must be an nn.Module, got {type(model).__name__}")
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise TypeError(
                f"graphed_train_step: optimizer must be a torch optimizer or None, got {type(optimizer).__name__}"
            )
        if not callable(loss_fn):
            raise TypeError("graphed_train_step: loss_fn must be callable as loss_fn(model, batch) -> scalar loss")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise ValueError(
                f"graphed_train_step: warmup must be an int >= 1 (eager steps before the capture), got {warmup!r}"
            )
        if grad_scaler is not None:
            if optimizer is None:
                raise ValueError("graphed_train_step: a grad_scaler needs an optimizer to step")
            if not all(callable(getattr(grad_scaler, f, None)) for f in ("scale", "step", "update")):
                raise TypeError(
                    "graphed_train_step: grad_scaler must be a torch.amp.GradScaler (scale, step, update), got "
                    f"{type(grad_scaler).__name__}"
                )
        if enabled not in (None, True, False):
            raise ValueError(f"graphed_train_step: enabled must be None (auto), True or False, got {enabled!r}")
        self.model, self.optimizer, self.loss_fn, self.warmup = model, optimizer, loss_fn, warmup
        self.grad_scaler = grad_scaler
        self._device = _graph_device(model, optimizer) if enabled is not False else None
        if enabled and self._device is None:
            raise ValueError(
                "graphed_train_step: enabled=True needs the trained parameters on one CUDA device"
                " (CPU models, or parameters on several devices, run eagerly: pass enabled=None)"
            )
        self._strict = enabled is True
        self._eager_only = self._device is None
        self._warm = 0
        self._graph = self._static = self._loss = None
        self._lr: list[tuple[Tensor, object]] = []  # per param group: (the tensor the graph reads, last value)
        self._grads: list[tuple[Tensor, Tensor | None]] = []
        self._grads_replaced = False
        self._sig = None
        self._since_capture = 0
        self._frequent = 0
        self.stats = {"eager": 0, "replays": 0, "captures": 0}

    graphed = property(lambda self: self._graph is not None)

    def __repr__(self) -> str:
        where = "eager only" if self._eager_only else (f"graphed on {self._device}" if self.graphed else "warming up")
        return f"GraphedTrainStep({where}, warmup={self.warmup}, stats={self.stats})"

    # ------------------------------------------------------------------ the step
    def __call__(self, batch=None) -> Tensor:
        """One training step on ``batch``; returns the loss (detached, on the model's device)."""
        if self._eager_only:
            return self._eager(batch)
        if self._graph is None:
            if self._warm < self.warmup:
                self._warm += 1
                return self._eager(batch, side_stream=True)
            return self._capture_and_run(batch)
        with torch.no_grad():  # a batch tensor that requires grad must not make the buffers autograd nodes
            why = _fill(self._static, batch, "batch")
        if self._signature() != self._sig:
            if why is None:
                return self._recapture(batch)
            self.reset()  # stale, and this batch is not the usual kind: the next usual one captures
        if why is not None:
            warnings.warn(
                f"graphed_train_step: this batch differs from the captured one ({why}); this call runs eagerly",
                stacklevel=2,
            )
            return self._eager(batch)
        self._sync_lr()
        if self._grads_replaced:  # an eager call gave params new .grad tensors: show the graph's again
            for p, g in self._grads:
                p.grad = g
            self._grads_replaced = False
        self._graph.replay()
        self.stats["replays"] += 1
        self._since_capture += 1
        return self._loss.detach().clone()  # the graph overwrites its own loss at the next replay

    def reset(self) -> None:
        """Drop the captured graph: the next call captures again (no warm-up). Call it after changing
        the model's code path (``merge_lora``, replaced layers), which no check here can see."""
        self._graph = self._static = self._loss = None
        self._grads, self._lr, self._sig = [], [], None

    # ------------------------------------------------------------------ eager
    def _zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)

    def _run(self, batch) -> Tensor:
        self._zero_grad()
        loss = self.loss_fn(self.model, batch)
        self._backward_and_step(loss)
        return loss.detach()

    def _backward_and_step(self, loss: Tensor) -> None:
        """Backward and optimizer step of ``loss`` (through the grad scaler when there is one), on the
        eager and the captured path alike."""
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(
                "graphed_train_step: loss_fn must return a one-element loss tensor, got "
                + (f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__)
            )
        scaler = self.grad_scaler
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(self.optimizer)
            scaler.update()
            return
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()

    def _eager(self, batch, side_stream: bool = False) -> Tensor:
        self.stats["eager"] += 1
        if self._graph is not None:
            self._grads_replaced = True
        if not (side_stream and self._device is not None and self._device.type == "cuda"):
            return self._run(batch)
        with graph_routing():  # the warm-up runs the kernels the capture will launch
            return on_side_stream(lambda: self._run(batch), self._device).clone()

    # ------------------------------------------------------------------ capture
    def _params(self) -> list[Tensor]:
        if self.optimizer is not None:
            return [p for g in self.optimizer.param_groups for p in g["params"]]
        return [p for p in self.model.parameters() if p.requires_grad]

    def _signature(self) -> tuple:
        """What the captured graph depends on beyond its static inputs and the lr tensors: a change
        here needs a new capture. Cheap enough for every call (0.05-0.15 ms for BERT-base's 146 LoRA
        tensors on a slow CPU): parameter storages, and the optimizer's groups and state by identity
        (``load_state_dict`` and ``state.clear()`` make new ones; tensors swapped inside a kept
        state dict are not seen: call :meth:`reset` after such surgery)."""
        opt = self.optimizer
        sig = [self.model.training, tuple(p.data_ptr() for p in self._params())]
        if opt is not None:
            groups = opt.param_groups
            sig += [
                id(groups),
                id(opt.state),
                tuple(map(id, opt.state.values())),  # iterating values: no tensor hashing per lookup
                tuple(
                    (id(g), len(g["params"]), tuple((k, _hyper_id(v)) for k, v in g.items() if k not in _DYNAMIC))
                    for g in groups
                ),
            ]
        return tuple(sig)

    def _lr_tensors(self) -> list[Tensor]:
        """Each group's lr as a one-element fp32 tensor on the graph's device (a user's device tensor
        is used as it is), refreshed from the group: what the captured optimizer step reads."""
        if self.optimizer is None:
            return []
        out = []
        for g in self.optimizer.param_groups:
            lr = g["lr"]
            if isinstance(lr, Tensor) and lr.device == self._device and lr.numel() == 1:
                t = lr
            else:
                t = torch.tensor(float(lr), dtype=torch.float32, device=self._device)
            out.append(t)
        return out

    def _sync_lr(self) -> None:
        """Refresh the graph's lr tensors from the groups (schedulers assign floats, or fill tensors)."""
        for i, g in enumerate(self.optimizer.param_groups if self.optimizer is not None else ()):
            t, last = self._lr[i]
            lr = g["lr"]
            if lr is t:
                continue
            if isinstance(lr, Tensor):
                t.copy_(lr.reshape(()))
            elif lr != last:
                t.fill_(float(lr))
                self._lr[i] = (t, lr)

    def _program(self, static, lrs: list[Tensor]) -> Callable[[], Tensor]:
        """The captured work: the step on the static batch with the groups reading the lr tensors."""

        def program() -> Tensor:
            groups = self.optimizer.param_groups if self.optimizer is not None else []
            kept = [g["lr"] for g in groups]
            for g, t in zip(groups, lrs):
                g["lr"] = t
            try:
                loss = self.loss_fn(self.model, _shallow(static))
                self._backward_and_step(loss)
            finally:
                for g, lr in zip(groups, kept):
                    g["lr"] = lr
            return loss

        return program

    @staticmethod
    def _record(program: Callable[[], Tensor]):
        """Capture ``program`` in a CUDA graph: (graph, the loss tensor its replays write). Nothing
        runs until a replay."""
        graph = torch.cuda.CUDAGraph()
        with graph_routing(), torch.cuda.graph(graph):
            loss = program()
        return graph, loss

    def _capture_and_run(self, batch) -> Tensor:
        with torch.no_grad():
            static = _to_static(batch, self._device)
        lrs = self._lr_tensors()
        self._zero_grad()  # backward allocates the grads inside the capture: the graph's own memory
        try:
            graph, loss = self._record(self._program(static, lrs))
        except Exception as e:
            if self._strict:
                raise
            return self._go_eager(f"the step could not be captured ({type(e).__name__}: {str(e)[:300]})", batch)
        self._graph, self._static, self._loss = graph, static, loss
        self._lr = [(t, g["lr"]) for t, g in zip(lrs, self.optimizer.param_groups if self.optimizer else ())]
        self._grads = [(p, p.grad) for p in self._params()]
        self._grads_replaced = False
        self._sig = self._signature()
        self.stats["captures"] += 1
        self._since_capture = 0
        graph.replay()  # the capture ran nothing: this call's step happens here
        self.stats["replays"] += 1
        return loss.detach().clone()

    def _recapture(self, batch) -> Tensor:
        if self._since_capture < _FREQUENT:
            self._frequent += 1
            if self._frequent >= _MAX_FREQUENT:
                return self._go_eager(
                    f"the optimizer or model changed in a way the graph cannot follow {self._frequent} times"
                    f" within {_FREQUENT} steps of a capture (a hyper-parameter other than lr changing every step,"
                    " e.g. OneCycleLR's cycle_momentum)",
                    batch,
                )
        self.reset()
        return self._capture_and_run(batch)

    def _go_eager(self, why: str, batch) -> Tensor:
        """Stop graphing for good (warned with ``why``) and run this call eagerly."""
        warnings.warn(f"graphed_train_step: {why}; every call runs eagerly from now on", stacklevel=4)
        self.reset()
        self._eager_only = True
        return self._eager(batch)


def graphed_train_step(model: nn.Module, optimizer, loss_fn: Callable, **options) -> GraphedTrainStep:
    """A training step of ``model`` that runs as one CUDA-graph replay after ``warmup`` eager steps.

    ``step = graphed_train_step(model, optimizer, loss_fn)``, then ``loss = step(batch)`` per batch:
    each call is ``optimizer.zero_grad(set_to_none=True); loss = loss_fn(model, batch);
    loss.backward(); optimizer.step()`` and returns the loss, detached. After the warm-up the batch
    is copied into the captured step's static buffers (tensors may come from the CPU; they are
    copied to the model's device, which is where ``loss_fn`` then finds them) and the step replays
    with no Python per layer. ``batch`` is any nesting of tensors in dicts (HF ``BatchEncoding`` too),
    lists and tuples; its shapes, dtypes and non-tensor values must match the captured call's,
    else that call runs eagerly (warned).

    Args (``options`` are the keyword-only ones, as :class:`GraphedTrainStep` takes them):
        model: the module being trained (its parameters' grads are set to None before each step).
        optimizer: a capturable optimizer: ftkernels' fused optimizers, or torch's with
            ``capturable=True``; None runs forward and backward only.
        loss_fn: ``loss_fn(model, batch) -> loss`` (one element). Put autocast inside it.
        warmup: eager steps before the capture (default 3, >= 1; they train on the batches given).
        enabled: None (default) graphs on CUDA and falls back to eager, warned, when the capture
            fails (a host sync in the model, say); True raises instead, and raises for a model not on
            one CUDA device; False is always eager.
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 AMP (scale, step and update inside the
            step), or None (default).

    The learning rate may change between calls; other changes the graph cannot follow re-capture
    it (see the module docstring). ``step.stats`` counts eager calls, replays and captures.
    """
    return GraphedTrainStep(model, optimizer, loss_fn, **options)
