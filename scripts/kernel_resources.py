"""Registers, spill bytes and shared memory of every Triton kernel launch, compiled for an H100
(sm_90a) on a machine without a GPU.

Each launcher in ``ftkernels/triton`` runs on CPU tensors of GPU-sized shapes; the launch is
captured instead of run, specialized as Triton's JIT would specialize it (ints equal to 1 become
constants, pointers and ints divisible by 16 are marked so), compiled by the installed Triton and
read back from the cubin with the bundled ``cuobjdump``. Autotuned kernels report every config.

Why: register spills and shared memory over the H100's 227 KB are invisible on CPU and cost 10x on
the GPU (bench/NOTES.md, session 5: an IEEE fp32 dot spilled 1436 registers and ran 20-50x off
cuBLAS). Run it after changing a kernel or its launch config; ``--check`` fails on spills or on
shared memory over the limit.

    TRITON_INTERPRET= python scripts/kernel_resources.py [--check] [--json FILE] [--only NAME]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from functools import partial

os.environ.pop("TRITON_INTERPRET", None)  # the launchers pick their GPU configs

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SMEM_LIMIT = 232448  # bytes of shared memory a block may use on sm_90 (227 KB)
TARGET = GPUTarget("cuda", 90, 128)
SMS = 132  # H100 SXM


def _specialize(arg):
    """(type, 'D' if 16-divisible) as the JIT's native specializer reports it."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    out = native_specialize_impl(CUDABackend, arg, False, True, True)
    return out[0], out[1]


class _Captured(Exception):
    pass


def capture(call):
    """The launches a launcher makes: [(JITFunction, bound args, options, configs or None)]."""
    launches = []
    jit_run, tune_run = JITFunction.run, Autotuner.run

    def fake_jit(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs, None))

    def fake_tune(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        configs = self.configs
        if self.early_config_prune:  # the configs the autotuner would time for these arguments
            configs = self.early_config_prune(configs, dict(zip(self.arg_names, args)), **kwargs)
        launches.append((self.fn, args, kwargs, configs))

    JITFunction.run, Autotuner.run = fake_jit, fake_tune
    try:
        call()
    finally:
        JITFunction.run, Autotuner.run = jit_run, tune_run
    return launches


def compile_launch(fn, args, kwargs, config=None):
    """Compile one launch for sm_90a: (registers, spill bytes, shared bytes)."""
    kwargs = dict(kwargs)
    opts = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    if config is not None:
        kwargs.update(config.kwargs)
        opts = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    bound = inspect.signature(fn.fn).bind_partial(*args, **kwargs).arguments
    sig, consts, attrs = {}, {}, {}
    for i, (name, kp) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        value = bound[name]
        if kp.is_constexpr:
            sig[name], consts[name] = "constexpr", value
            continue
        ty, spec = _specialize(value)
        if ty == "constexpr":
            sig[name], consts[name] = "constexpr", spec
            continue
        sig[name] = ty
        if isinstance(spec, str) and "D" in spec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=TARGET,
                            options=opts)  # fmt: skip
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out.stdout)
    return int(m.group(1)), int(m.group(2)), int(kernel.metadata.shared)


def cases():
    """(name, launcher call) at the sizes the benchmarks and e2e models use."""
    from ftkernels.triton import lora_dropout, loreft, masked
    from ftkernels.triton import lora_linear as ll

    ll._sm_count = masked._sm_count = lambda device: SMS  # no GPU to ask
    seed = torch.zeros((), dtype=torch.int64)
    out = []
    for dt in (torch.bfloat16, torch.float32):
        tag = str(dt).replace("torch.", "")

        def e(*shape, dtype=dt):
            return torch.empty(shape, dtype=dtype)

        for M, K, R in ((4096, 768, 16), (8192, 4096, 16)):
            x, a, v = e(M, K), e(R, K), e(M, R)
            for p in (0.0, 0.1):
                out.append((f"lora_down {tag} M{M} K{K} r{R} p{p}", partial(ll.lora_down, x, a, seed, p)))
            out.append((f"lora_grad_a {tag} M{M} K{K}", partial(ll.lora_grad_a, x, v, a, seed, 0.1)))
            dx = partial(ll.lora_grad_a, x, v, a, seed, 0.1, grad_x=e(M, K))
            out.append((f"lora_grad_a+dx {tag} M{M} K{K}", dx))
        x, w, b, u, lb = e(4096, 768), e(768, 768), e(768), e(4096, 16), e(768, 16)
        gemm = partial(ll.lowrank_gemm, x, w.t(), b, u, lb.t(), 2.0, seed, 0.1)
        out.append((f"lowrank_gemm {tag} M4096 K=N=768 p0.1", gemm))
        out.append((f"lora_dropout {tag} 4096x768", partial(lora_dropout.lora_dropout, x, 0.1, seed)))
        h, g = e(8192, 4096), e(8192, 4096)
        for r in (4, 8):  # r <= 4: the FMA kernels; above: the tensor-core ones
            s = e(8192, r, dtype=torch.float32)
            rot, wr, br = e(r, 4096, dtype=torch.float32), e(r, 4096, dtype=torch.float32), e(r, dtype=torch.float32)
            for p in (0.0, 0.1):
                fwd = partial(loreft.forward, h, rot, wr, br, p, seed)
                bwd = partial(loreft.backward, g, h, rot, wr, s, p, seed)
                out.append((f"loreft fwd {tag} 8192x4096 r{r} p{p}", fwd))
                out.append((f"loreft bwd {tag} 8192x4096 r{r} p{p}", bwd))
                if r <= 4:  # the FMA kernels' prefetch option too
                    out.append((f"loreft fwd prefetch {tag} 8192x4096 r{r} p{p}", partial(loreft.with_prefetch, fwd)))
                    out.append((f"loreft bwd prefetch {tag} 8192x4096 r{r} p{p}", partial(loreft.with_prefetch, bwd)))
        rows, zrows = torch.arange(0, 4096, 10), torch.arange(1, 4096, 10)  # (zrows: only its count matters)
        gt = e(rows.numel(), 8192)
        out.append((f"masked gather_t {tag} M8192 N4096 10%", partial(masked.gather_t, g, rows)))
        fill = partial(masked.fill_rows, gt[:, :4096], e(4096, dtype=torch.int32), (4096, 4096), dt)
        out.append((f"masked fill_rows {tag} 4096x4096", fill))
        gemm = partial(masked.rows_gemm, gt, h, rows, zrows, (4096, 4096))
        out.append((f"masked rows_gemm {tag} M8192 K=N=4096 10%", gemm))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 on any spill or shared memory over 227 KB")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--only", default="", help="substring of the case names to run")
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}, target sm_90a, {SMS} SMs", flush=True)
    rows, bad = [], []
    for name, call in cases():
        if args.only not in name:
            continue
        for fn, a, kw, configs in capture(call):
            for cfg in configs or [None]:
                reg, spill, smem = compile_launch(fn, a, kw, cfg)
                label = f"{name} :: {fn.__name__}" + (f" {cfg}" if cfg is not None else "")
                rows.append({"case": label, "registers": reg, "spill_bytes": spill, "shared_bytes": smem})
                flag = " SPILLS" if spill else ""
                flag += " SMEM>227KB" if smem > SMEM_LIMIT else ""
                if flag:
                    bad.append(label)
                print(f"{label:110s} reg {reg:3d} spill {spill:5d} smem {smem:6d}{flag}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm_90a", "rows": rows}, f, indent=1)
    if bad:
        print(f"{len(bad)} launch(es) spill or exceed shared memory", flush=True)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
