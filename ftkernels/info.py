"""``ftkernels.build_info()`` and the ``ftkernels info`` table."""

from __future__ import annotations

import importlib.util

import torch

from . import _ext
from ._registry import OPS


def _version() -> str:
    return _ext.installed_version() or "0.1.0+unknown"


def triton_version() -> str | None:
    """Installed Triton version, or None (Triton is optional)."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton
    except Exception:  # a broken Triton install must not break ftkernels
        return None
    return getattr(triton, "__version__", "unknown")


def build_info() -> dict:
    """How ftkernels was built and what serves each op here.

    Returns a dict with: ``version``; ``torch_built`` (torch the extension was compiled against) and
    ``torch_runtime`` (``torch.__version__``); ``cpu_extension`` (``ftkernels._C`` loads);
    ``extension_error`` (why not, or None); ``cuda_compiled``; ``cuda_archs`` (list like
    ``["8.0", "9.0"]``); ``cuda_available`` (a CUDA device is usable now); ``triton`` (version or
    None); ``cpu_isa``; and ``backends``: ``{op: {"cpu": kind or None, "cuda": kind or None}}``.
    """
    native = {}
    info = {
        "version": _version(),
        "torch_built": None,
        "torch_runtime": torch.__version__,
        "cpu_extension": _ext.available(),
        "extension_error": _ext.error(),
        "cuda_compiled": False,
        "cuda_archs": [],
        "cuda_available": torch.cuda.is_available(),
        "triton": triton_version(),
        "cpu_isa": None,
    }
    if _ext.available():
        c = _ext.C().build_info()
        info.update(
            version=c["version"],
            torch_built=c["torch_built"],
            cuda_compiled=bool(c["cuda_compiled"]),
            cuda_archs=list(c["cuda_archs"]),
            cpu_isa=c["cpu_isa"],
        )
        native = {k: list(v) for k, v in c["native_ops"].items()}
    backends = {}
    for op, kinds in OPS.items():
        row = {}
        for dev in ("cpu", "cuda"):
            kind = kinds.get(dev)
            if kind in ("c++", "cuda"):
                kind = kind if dev in native.get(op, []) else None
            elif kind == "triton":
                kind = kind if info["triton"] else None
            row[dev] = kind
        backends[op] = row
    info["backends"] = backends
    return info


def format_info(info: dict | None = None) -> str:
    """``build_info()`` as a plain-text table."""
    info = info or build_info()
    lines = []
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k == "backends":
            continue
        if isinstance(v, list):
            v = ";".join(v) or "-"
        lines.append(f"{k:<{width}}  {v}")
    lines.append("")
    ops = info["backends"]
    ow = max([len("op")] + [len(o) for o in ops])
    lines.append(f"{'op':<{ow}}  {'cpu':<8}  cuda")
    for op, row in ops.items():
        lines.append(f"{op:<{ow}}  {row['cpu'] or 'missing':<8}  {row['cuda'] or 'missing'}")
    return "\n".join(lines)
