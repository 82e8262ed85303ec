"""Every Triton launch of ours compiles for an H100 (sm_90a) without register spills and within the
227 KB of shared memory a block may use, at the sizes the benchmarks run. Compiled ahead of time by
the installed Triton (no GPU needed), read back from the cubin: scripts/kernel_resources.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tools_missing() -> str | None:
    try:
        import triton
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"triton's CUDA backend is not importable: {e}"
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return None if tool.exists() else f"no {tool}"


@pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))
def test_no_triton_launch_spills_or_overflows_shared_memory_on_h100(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "resources.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "kernel_resources.py"), "--check", "--json", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["case"].split(" :: ")[1].split(" ")[0] for r in rows}
    # every kernel family was compiled (a launcher that stopped launching would pass vacuously)
    assert kernels >= {
        "_lora_down_kernel", "_lora_grad_a_kernel", "_lowrank_gemm_kernel", "_lora_dropout_kernel",
        "_reft_fwd_kernel", "_reft_bwd_kernel", "_reft_fwd_fma_kernel", "_reft_bwd_fma_kernel", "_gather_t_kernel",
        "_fill_rows_kernel", "_rows_gemm_kernel",
    }  # fmt: skip
    assert all(r["spill_bytes"] == 0 and r["shared_bytes"] <= 232448 for r in rows)
    assert all(0 < r["registers"] <= 255 for r in rows)
