"""Plain-PyTorch reference of the fused optimizer step: the test oracle.

Written from the math in :mod:`ftkernels.optim._fused` with ordinary torch ops, one param at a time,
in the param's own dtype (use float64 params for a tight oracle). It shares no code with the
kernels: the Philox RNG is re-implemented here in NumPy.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..masks import get_grad_mask

_M32 = np.uint64(0xFFFFFFFF)


def philox_words(seed: int, x, y, z, w):
    """Philox4x32-10 (key ``seed``) of counters given as four uint64 NumPy arrays of 32-bit words."""
    x, y, z, w = (np.asarray(c, dtype=np.uint64) & _M32 for c in (x, y, z, w))
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p0, p1 = m0 * x, m1 * z
        x, y, z, w = (p1 >> np.uint64(32)) ^ y ^ k0, p1 & _M32, (p0 >> np.uint64(32)) ^ w ^ k1, p0 & _M32
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M32
    return x, y, z, w


def draws16(words) -> np.ndarray:
    """The 16-bit draws of Philox blocks ``[..., 4 words]`` in lane order: word by word, low half first."""
    words = np.stack(words, axis=-1)
    return np.stack([words & np.uint64(0xFFFF), words >> np.uint64(16)], axis=-1).reshape(*words.shape[:-1], 8)


def philox_uniform(seed: int, tensor_id: int, numel: int) -> torch.Tensor:
    """The gradient-dropout uniforms of a tensor: element ``i`` takes 16 bits of Philox4x32-10 at
    counter ``(i // 8, tensor_id, 0x46544B31)``, key ``seed``: word ``(i % 8) // 2``, low half first,
    divided by 2^16 -> [0, 1)."""
    groups = np.arange((numel + 7) // 8, dtype=np.uint64)
    words = philox_words(seed, groups & _M32, groups >> np.uint64(32), np.full_like(groups, tensor_id), 0x46544B31)
    return torch.from_numpy(draws16(words).reshape(-1)[:numel].astype(np.float64) / 65536.0)


def reference_update(
    kind: str, p, g, state: dict, group: dict, *, step: int, lr: float, gscale: float = 1.0, drop=None, mask=None
) -> None:
    """One step of ``kind`` on one param, in place on ``p`` and ``state``.

    ``gscale`` = 1/grad_scale * clip coefficient; ``drop``: dropout multipliers (0 or 1/(1-p)) of
    p's shape or None; ``mask``: bool of p's shape (False = frozen) or None.
    """
    old_p = p.clone()
    old_state = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    g = g * gscale
    if group.get("maximize", False):
        g = -g
    if drop is not None:
        g = g * drop
    wd = group.get("weight_decay", 0.0)
    l2 = group.get("l2", 0.0) + (0.0 if kind == "adamw" else wd)
    if l2:
        g = g + l2 * p
    if group.get("l2sp", 0.0) or group.get("ewc", 0.0):
        pull = group.get("l2sp", 0.0) + group.get("ewc", 0.0) * state.get("fisher", 0.0)
        g = g + pull * (p - state["anchor"])
    if kind == "adamw":
        b1, b2 = group["betas"]
        p.mul_(1 - lr * wd)
        state["exp_avg"].lerp_(g, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        v = state["exp_avg_sq"]
        if group.get("amsgrad", False):
            torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
            v = state["max_exp_avg_sq"]
        denom = v.sqrt() / math.sqrt(1 - b2**step) + group["eps"]
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**step))
    elif kind == "sgd":
        mom = group.get("momentum", 0.0)
        if mom:
            buf = state["momentum_buffer"]
            if step == 1:
                buf.copy_(g)
            else:
                buf.mul_(mom).add_(g, alpha=1 - group.get("dampening", 0.0))
            g = g + mom * buf if group.get("nesterov", False) else buf
        p.add_(g, alpha=-lr)
    elif kind == "adagrad":
        clr = lr / (1 + (step - 1) * group.get("lr_decay", 0.0))
        state["sum"].addcmul_(g, g)
        p.addcdiv_(g, state["sum"].sqrt() + group["eps"], value=-clr)
    elif kind == "rmsprop":
        alpha = group["alpha"]
        state["square_avg"].mul_(alpha).addcmul_(g, g, value=1 - alpha)
        if group.get("centered", False):
            state["grad_avg"].lerp_(g, 1 - alpha)
            avg = (state["square_avg"] - state["grad_avg"] ** 2).sqrt() + group["eps"]
        else:
            avg = state["square_avg"].sqrt() + group["eps"]
        if group.get("momentum", 0.0) > 0:
            state["momentum_buffer"].mul_(group["momentum"]).addcdiv_(g, avg)
            p.add_(state["momentum_buffer"], alpha=-lr)
        else:
            p.addcdiv_(g, avg, value=-lr)
    else:
        raise ValueError(f"unknown optimizer kind {kind!r}")
    if group.get("l1", 0.0):
        t = lr * group["l1"]
        p.copy_(p.sign() * (p.abs() - t).clamp_min(0))
    if mask is not None:
        frozen = ~mask
        p[frozen] = old_p[frozen]
        for k, v in old_state.items():
            state[k][frozen] = v[frozen]


class ReferenceOptimizer:
    """The fused optimizers' semantics in plain PyTorch (per-param loops), same state names.

    ``ReferenceOptimizer(kind, params, **group)`` with ``kind`` in adamw/sgd/adagrad/rmsprop and the
    group options of the matching fused optimizer; ``step(grad_scale=None, found_inf=None)``.
    Draws the dropout seed from torch's default generator exactly as the fused optimizers do.
    """

    def __init__(self, kind: str, params, anchors=None, fisher=None, **group):
        self.kind = kind
        self.params = list(params)
        self.group = group
        self.state = {}
        for p in self.params:
            st = {"step": 0}
            if group.get("l2sp", 0.0) or group.get("ewc", 0.0):
                st["anchor"] = (anchors or {}).get(p, p).detach().clone()
            if group.get("ewc", 0.0):
                st["fisher"] = fisher[p].detach().clone()
            self.state[p] = st

    def _init(self, p, st):
        z = lambda: torch.zeros_like(p)  # noqa: E731
        keys = {
            "adamw": ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if self.group.get("amsgrad") else []),
            "sgd": ["momentum_buffer"] if self.group.get("momentum", 0.0) else [],
            "adagrad": [],
            "rmsprop": ["square_avg"]
            + (["momentum_buffer"] if self.group.get("momentum", 0.0) > 0 else [])
            + (["grad_avg"] if self.group.get("centered") else []),
        }[self.kind]
        for k in keys:
            st.setdefault(k, z())
        if self.kind == "adagrad":
            st.setdefault("sum", torch.full_like(p, self.group.get("initial_accumulator_value", 0.0)))

    @torch.no_grad()
    def step(self, grad_scale=None, found_inf=None):
        """One step in plain PyTorch ops in the params' own dtype (tests pass float64 params): AMP unscale
        (skipped when ``found_inf``), clipping by the global norm, gradient dropout from the same Philox
        stream as the kernels, then :func:`reference_update` per param with its grad mask."""
        live = [(i, p) for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        pdrop = self.group.get("grad_dropout", 0.0)
        seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64)) if pdrop else 0
        if found_inf is not None and float(found_inf) != 0:
            return
        inv = 1.0 / float(grad_scale) if grad_scale is not None else 1.0
        clip = 1.0
        mgn = self.group.get("max_grad_norm")
        if mgn:
            # in the grads' own dtype, as any implementation in that precision would
            norms = torch.stack([torch.linalg.vector_norm(p.grad) for _, p in live])
            norm = float(torch.linalg.vector_norm(norms)) * inv
            if not math.isfinite(norm):
                return
            clip = min(1.0, mgn / (norm + 1e-6))
        lr = float(self.group["lr"])
        for i, p in live:
            st = self.state[p]
            self._init(p, st)
            st["step"] += 1
            drop = None
            if pdrop:
                u = philox_uniform(seed, i, p.numel()).view(p.shape).to(p.dtype)
                keep = u >= float(np.float32(pdrop))  # the kernels compare against p in fp32
                drop = keep.to(p.dtype) / (1 - pdrop)
            reference_update(
                self.kind,
                p,
                p.grad,
                st,
                self.group,
                step=st["step"],
                lr=lr,
                gscale=inv * clip,
                drop=drop,
                mask=get_grad_mask(p),
            )
