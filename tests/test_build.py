"""The compiled extension loads and build_info() tells the truth."""

import subprocess
import sys

import pytest
import torch

import ftkernels
from ftkernels import _ext
from ftkernels._registry import OPS


def test_extension_loads():
    assert _ext.available(), _ext.error()
    assert hasattr(_ext.C(), "fused_optim_step")


def test_build_info_matches_reality():
    info = ftkernels.build_info()
    assert info["torch_runtime"] == torch.__version__
    assert info["torch_built"] == torch.__version__  # built in this environment
    assert info["cpu_extension"] is True and info["extension_error"] is None
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["cuda_compiled"] == (torch.version.cuda is not None and bool(info["cuda_archs"]))
    flavour = "cpu" if not info["cuda_compiled"] else "cu" + torch.version.cuda.replace(".", "")
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert info["version"].endswith(f"+{flavour}.torch{torch_mm}")
    assert info["version"] == ftkernels.__version__
    assert set(info["backends"]) == set(OPS)
    for op, row in info["backends"].items():
        assert row["cpu"] == OPS[op]["cpu"]
        if OPS[op]["cuda"] == "triton":  # Triton kernels need no compiled CUDA, only triton
            assert row["cuda"] == ("triton" if info["triton"] else None)
        else:
            assert row["cuda"] == (OPS[op]["cuda"] if info["cuda_compiled"] else None)
    try:
        import triton
    except ImportError:
        assert info["triton"] is None
    else:
        assert info["triton"] == triton.__version__


@pytest.mark.parametrize("cmd", [["-m", "ftkernels", "info"], ["-m", "ftkernels", "info", "--json"]])
def test_info_cli(cmd):
    out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, check=True).stdout
    assert torch.__version__ in out
    assert "fused_optim_step" in out


def test_missing_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", "ftkernels._C could not be loaded (test); rebuild it")
    assert ftkernels.build_info()["cpu_extension"] is False
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    opt = ftkernels.optim.FusedAdamW([p])
    with pytest.raises(ftkernels.ExtensionError, match="rebuild"):
        opt.step()


def test_cuda_missing_backend_is_named(monkeypatch):
    if ftkernels.build_info()["cuda_compiled"]:
        pytest.skip("this build has CUDA")
    with pytest.raises(ftkernels.ExtensionError, match="without CUDA"):
        _ext.require_device("fused_optim_step", torch.device("cuda"))
