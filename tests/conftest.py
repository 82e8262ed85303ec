"""Test set-up: Triton runs through its CPU interpreter unless a GPU is present; `cuda` marks skip
without one."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(params=[True, False], ids=["cpp_node", "py_function"])
def lora_node(request, monkeypatch):
    """Runs a test with eager LoRA calls through the C++ autograd node where it serves them, and again
    through the Python autograd Functions (what CUDA calls with dropout use under graph capture)."""
    from ftkernels.ops import lora_linear

    monkeypatch.setattr(lora_linear, "_node_on", request.param)
    return request.param
