// CUDA kernel of lora_mask_apply (ftk/lora_host.h): the LoRA dropout mask on a contiguous [M, K]
// tensor, copied out or added into an accumulator. One thread per Philox group (8 consecutive
// columns of one row: one 10-round Philox call), with 8-element vector accesses when rows allow.
// The C++ LoRA node's GEMM route runs it around cuBLAS, so a dropout call needs no Triton launch
// from Python. Host dispatch and checks: csrc/cpu/lora_dropout.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ftk/lora.h"
#include "ftk/lora_host.h"

namespace ftk {
namespace {

constexpr int kThreads = 256;

template <class T>
struct alignas(sizeof(T) * 8) Pack8 {
  T v[8];
};

// Products rounded on their own (no FMA contraction into the accumulation): the same bits as the
// CPU kernel, which is built with -ffp-contract=off.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// out = keep ? src * scale : 0 (ACC: out += that), element (row, k) kept iff its draw >= thr.
template <class T, bool ACC>
__global__ void mask_apply_kernel(const T* __restrict__ src, T* __restrict__ out, const int64_t* __restrict__ seed_p,
                                  int64_t M, int64_t K, int64_t groups, uint32_t thr, double scale, bool vec) {
  using acc_t = at::opmath_type<T>;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= M * groups) return;
  const int64_t row = t / groups, grp = t - row * groups;
  const U32x4 r = philox_dropout_words(static_cast<uint64_t>(*seed_p), kLoraStream,
                                       lora_dropout_group(static_cast<uint64_t>(row), static_cast<uint64_t>(grp) * 8));
  const int64_t base = row * K + grp * 8;
  const acc_t sc = static_cast<acc_t>(scale);
  const int n = K - grp * 8 < 8 ? static_cast<int>(K - grp * 8) : 8;
  Pack8<T> s, o;
  if (vec) {  // n == 8 and 8-element aligned
    s = *reinterpret_cast<const Pack8<T>*>(src + base);
    if (ACC) o = *reinterpret_cast<const Pack8<T>*>(out + base);
  } else {  // unrolled with constant indices: the packs stay in registers
#pragma unroll
    for (int l = 0; l < 8; ++l) {
      s.v[l] = l < n ? src[base + l] : T(0);
      if (ACC) o.v[l] = l < n ? out[base + l] : T(0);
    }
  }
#pragma unroll
  for (int l = 0; l < 8; ++l) {
    const acc_t v = dropout_draw16(r, l) >= thr ? mul_rn(static_cast<acc_t>(s.v[l]), sc) : acc_t(0);
    o.v[l] = static_cast<T>(ACC ? static_cast<acc_t>(o.v[l]) + v : v);
  }
  if (vec) {
    *reinterpret_cast<Pack8<T>*>(out + base) = o;
  } else {
#pragma unroll
    for (int l = 0; l < 8; ++l) {
      if (l < n) out[base + l] = o.v[l];
    }
  }
}

}  // namespace

at::Tensor lora_mask_apply_cuda(const at::Tensor& src, const at::Tensor& seed, uint32_t thr, double scale,
                                at::Tensor acc) {
  const c10::cuda::CUDAGuard guard(src.device());
  const bool accumulate = acc.defined();
  at::Tensor out = accumulate ? acc : at::empty_like(src, at::MemoryFormat::Contiguous);
  const int64_t M = src.size(0), K = src.size(1), groups = (K + 7) / 8;
  if (src.numel() == 0) return out;
  const int64_t threads = M * groups;
  const auto blocks = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "lora_mask_apply_cuda", [&] {
    const auto align = static_cast<uintptr_t>(sizeof(scalar_t) * 8);
    const bool vec = K % 8 == 0 && reinterpret_cast<uintptr_t>(src.data_ptr()) % align == 0 &&
                     reinterpret_cast<uintptr_t>(out.data_ptr()) % align == 0;
    const auto* sp = src.data_ptr<scalar_t>();
    auto* op = out.data_ptr<scalar_t>();
    const auto* seed_p = seed.data_ptr<int64_t>();
    if (accumulate) {
      mask_apply_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(sp, op, seed_p, M, K, groups, thr,
                                                                          scale, vec);
    } else {
      mask_apply_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(sp, op, seed_p, M, K, groups, thr,
                                                                           scale, vec);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace ftk
