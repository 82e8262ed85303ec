"""Lazy loading of the compiled extension ``ftkernels._C``.

Importing ftkernels never fails because the extension is missing or was built for another torch;
the first op that needs it raises :class:`ExtensionError` with the reason and the fix.
"""

from __future__ import annotations

import importlib
import importlib.metadata

import torch

_REBUILD = "rebuild it against the installed torch: `pip install --no-build-isolation --force-reinstall .`"


class ExtensionError(RuntimeError):
    """The compiled extension is missing, was built for another torch, or lacks a backend."""


_module = None
_error: str | None = None


def installed_version() -> str | None:
    """The installed distribution's version, e.g. ``0.1.0+cu130.torch2.14`` (None from a bare tree)."""
    try:
        return importlib.metadata.version("ftkernels")
    except importlib.metadata.PackageNotFoundError:
        return None


def _built_torch() -> str | None:
    # The local version tag names the torch major.minor the extension was built against.
    v = installed_version() or ""
    tag = v.rpartition(".torch")[2] if ".torch" in v else None
    return tag or None


def _load():
    global _module, _error
    if _module is not None or _error is not None:
        return
    try:
        _module = importlib.import_module("ftkernels._C")
    except ImportError as e:  # missing .so, or undefined symbols from a torch ABI mismatch
        built = _built_torch()
        if built and not torch.__version__.startswith(built + "."):
            _error = (
                f"ftkernels._C was built for torch {built} but torch {torch.__version__} is installed; {_REBUILD} ({e})"
            )
        else:
            _error = f"ftkernels._C could not be loaded ({e}); {_REBUILD}"


def available() -> bool:
    """True when ``ftkernels._C`` loads in this process."""
    _load()
    return _module is not None


def error() -> str | None:
    """Why the extension is unavailable, or None."""
    _load()
    return _error


def C():
    """The loaded extension module; raises :class:`ExtensionError` naming the fix if it cannot load."""
    _load()
    if _module is None:
        raise ExtensionError(_error)
    return _module


def require_device(op: str, device: torch.device) -> None:
    """Raise a named error when ``op`` has no compiled kernel for ``device`` in this build."""
    devices = C().build_info()["native_ops"].get(op, [])
    if device.type not in devices:
        hint = (
            "this ftkernels._C was built without CUDA; build with a CUDA torch and nvcc (or FTKERNELS_FORCE_CUDA=1)"
            if device.type == "cuda"
            else f"no {device.type} kernel exists for it"
        )
        raise ExtensionError(f"ftkernels op {op!r} has no kernel for device {device}: {hint}")
