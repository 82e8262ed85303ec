"""Per-shape choice between two implementations of one op (our Triton kernel or a torch/cuBLAS
route), like Triton's autotuner: an environment variable forces one, ``auto`` times every
candidate once per shape key on the GPU and keeps the fastest."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


class Route:
    """``env`` selects ``auto`` or one of ``routes``; ``default`` applies when it is unset. ``safe`` is
    taken without timing where timing is impossible or meaningless: the Triton interpreter, no CUDA,
    or inside CUDA graph capture (nothing is cached then)."""

    def __init__(self, env: str, routes: tuple[str, ...], default: str, safe: str):
        self.env, self.routes, self.default, self.safe = env, routes, default, safe
        self._chosen: dict[tuple, str] = {}

    def setting(self) -> str:
        """The environment's setting (validated): ``auto`` or a route name."""
        value = os.environ.get(self.env, self.default)
        if value != "auto" and value not in self.routes:
            raise ValueError(f"{self.env} must be one of auto, {', '.join(self.routes)}; got {value!r}")
        return value

    def pick(self, key: tuple, candidates: dict[str, Callable[[], object]], setting: str | None = None) -> str:
        """The route for ``key``: ``setting`` (default: the environment's) unless it is ``auto``; then
        each candidate (route name -> a call running it) is timed once and the fastest kept."""
        setting = self.setting() if setting is None else setting
        if setting != "auto":
            return setting
        if key in self._chosen:
            return self._chosen[key]
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if interpret or not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
            return self.safe
        from triton.testing import do_bench

        times = {name: do_bench(fn, warmup=5, rep=20) for name, fn in candidates.items()}
        self._chosen[key] = min(times, key=times.get)
        return self._chosen[key]

    def chosen(self) -> dict[tuple, str]:
        """The per-shape choices made so far."""
        return dict(self._chosen)
