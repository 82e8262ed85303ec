"""ftkernels: fused kernels for fine-tuning.

Public API; the compiled extension (``ftkernels._C``) is loaded lazily by the ops that need it,
so importing ftkernels never fails for a missing optional part.
"""

from . import _ext, masks, nn, optim
from ._ext import ExtensionError
from .fisher import fisher_diagonal
from .freeze import FreezeSummary, freeze
from .graphed_step import GraphedTrainStep, graphed_train_step
from .info import build_info
from .masks import clear_grad_mask, get_grad_mask, set_grad_mask
from .ops.torch_func import plain_ops
from .peft_compat import (
    apply_lora,
    disable_adapters,
    from_peft,
    load_adapter,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)
from .reft import ReftModel, apply_reft, load_reft

__version__ = _ext.installed_version() or "0.1.0+unknown"

__all__ = [
    "ExtensionError",
    "FreezeSummary",
    "GraphedTrainStep",
    "ReftModel",
    "__version__",
    "apply_lora",
    "apply_reft",
    "build_info",
    "clear_grad_mask",
    "disable_adapters",
    "fisher_diagonal",
    "freeze",
    "from_peft",
    "get_grad_mask",
    "graphed_train_step",
    "load_adapter",
    "load_reft",
    "masks",
    "merge_lora",
    "nn",
    "optim",
    "plain_ops",
    "save_adapter",
    "set_grad_mask",
    "unload_lora",
    "unmerge_lora",
]
