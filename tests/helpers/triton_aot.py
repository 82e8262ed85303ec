"""Compile ftkernels' Triton kernels ahead of time for a GPU target, with no GPU: catches what the
interpreter lets through (non-constexpr globals, dtype and shape rules of tl.dot, layout limits).

    python tests/helpers/triton_aot.py [capability=90]   (run without TRITON_INTERPRET)
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ftkernels.triton import lora_dropout as TD
from ftkernels.triton import lora_linear as T


def compile_kernel(kernel, target, types, consts, **options):
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # unwrap @triton.autotune
        fn = fn.fn
    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=target, options=options)


def main(capability: int) -> None:
    target = GPUTarget("cuda", capability, 32)
    for dt in ("bf16", "fp16", "fp32"):
        p = "*" + dt
        compile_kernel(
            T._lowrank_gemm_kernel, target,
            dict(x_ptr=p, w_ptr=p, bias_ptr=p, u_ptr=p, v_ptr=p, out_ptr=p, seed_ptr="*i64", scale="fp32", thr="i32"),
            dict(HAS_BIAS=True, DROPOUT=True, PREC="ieee", BR=16, BM=128, BN=128, BK=64, GROUP_M=8),
            num_warps=8, num_stages=3,
        )  # fmt: skip
        compile_kernel(
            T._lora_down_kernel, target,
            dict(x_ptr=p, a_ptr=p, u_ptr=p, seed_ptr="*i64", thr="i32", inv_keep="fp32"),
            dict(DROPOUT=True, PREC="ieee", BM=64, BK=128, BR=16), num_warps=4,
        )  # fmt: skip
        compile_kernel(
            T._lora_grad_a_kernel, target,
            dict(x_ptr=p, v_ptr=p, a_ptr=p, gx_ptr=p, part_ptr="*fp32", seed_ptr="*i64", thr="i32", inv_keep="fp32"),
            dict(DX=True, SPLIT=4, PREC="ieee", BM=64, BK=128, BR=16), num_warps=4,
        )  # fmt: skip
        compile_kernel(
            TD._lora_dropout_kernel, target,
            dict(x_ptr=p, out_ptr=p, seed_ptr="*i64", thr="i32", inv_keep="fp32", sx0="i64", so0="i64"),
            dict(BM=32, BK=128), num_warps=4,
        )  # fmt: skip
        print(dt, "ok")
    compile_kernel(T._keep_mask_kernel, target, dict(seed_ptr="*i64", out_ptr="*i8", thr="i32"), dict(BM=16, BK=32))
    print(f"all kernels compiled for sm_{capability}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
