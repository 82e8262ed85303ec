// D(x) of the LoRA dropout stream (ftk/lora.h) for a tensor of any memory format: element
// (i0, ..., i_{d-2}, k) is element (row, k) of x's logical [numel / K, K] view (row-major over the
// leading dims), so NCHW and channels-last inputs get the same mask. Used by LoRA layers whose
// low-rank path is an ATen op (convolutions): the dropped copy lives only while that op runs.
// Also the mask applied to a 2-D tensor (lora_mask_apply: CPU here, CUDA in csrc/cuda/lora_dropout.cu)
// for the C++ LoRA node's GEMM route.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "ftk/check.h"
#include "ftk/lora_cpu.h"
#include "ftk/lora_host.h"

namespace ftk {
namespace {

// One row of either op: o[k] = (accumulate ? o[k] : 0) + (kept ? s[k] * sc : 0), in opmath. A dropped
// element gives exactly 0 (no multiply by a 0 multiplier), as the CUDA kernel does.
template <typename T, typename Acc>
inline void mask_row(const uint16_t* draws, uint32_t thr, Acc sc, const T* s, int64_t ss, T* o, int64_t os, int64_t K,
                     bool accumulate) {
  for (int64_t k = 0; k < K; ++k) {
    const Acc v = draws[k] >= thr ? static_cast<Acc>(s[k * ss]) * sc : Acc(0);
    o[k * os] = static_cast<T>(accumulate ? static_cast<Acc>(o[k * os]) + v : v);
  }
}

}  // namespace

at::Tensor lora_dropout_cpu(const at::Tensor& x, double dropout, int64_t seed) {
  FTK_CHECK(x.dim() >= 1, "ftkernels lora_dropout: x must have at least one dimension");
  FTK_CHECK(dropout >= 0 && dropout < 1, "ftkernels lora_dropout: dropout must be in [0, 1), got ", dropout);
  at::Tensor out = at::empty_like(x);  // same memory format
  const int64_t K = x.size(-1), rows = K == 0 ? 0 : x.numel() / K, nd = x.dim() - 1;
  if (rows == 0) return out;
  const uint32_t thr = dropout_threshold(dropout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_keep = static_cast<acc_t>(1.0 / (1.0 - dropout));
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t xsk = x.stride(-1), osk = out.stride(-1);
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      std::vector<uint16_t> draws(8 * ((K + 7) / 8));
      for (int64_t row = r0; row < r1; ++row) {
        int64_t rem = row, xo = 0, oo = 0;  // row -> leading indices -> offsets, last leading dim fastest
        for (int64_t d = nd - 1; d >= 0; --d) {
          const int64_t i = rem % x.size(d);
          rem /= x.size(d);
          xo += i * x.stride(d);
          oo += i * out.stride(d);
        }
        lora_row_draws(static_cast<uint64_t>(seed), row, K, draws.data());
        mask_row(draws.data(), thr, inv_keep, xp + xo, xsk, op + oo, osk, K, false);
      }
    });
  });
  return out;
}

at::Tensor lora_mask_apply_cpu(const at::Tensor& src, int64_t seed, uint32_t thr, double scale, at::Tensor acc) {
  const bool accumulate = acc.defined();
  at::Tensor out = accumulate ? acc : at::empty_like(src);
  const int64_t M = src.size(0), K = src.size(1);
  if (src.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "lora_mask_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t sc = static_cast<acc_t>(scale);
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
      std::vector<uint16_t> draws(8 * ((K + 7) / 8));
      for (int64_t row = r0; row < r1; ++row) {
        lora_row_draws(static_cast<uint64_t>(seed), row, K, draws.data());
        mask_row(draws.data(), thr, sc, sp + row * K, 1, op + row * K, 1, K, accumulate);
      }
    });
  });
  return out;
}

at::Tensor lora_mask_apply(const at::Tensor& src, const at::Tensor& seed, double dropout, double scale,
                           const c10::optional<at::Tensor>& acc) {
  FTK_CHECK(src.dim() == 2, "ftkernels lora_mask_apply: src must be 2-D [M, K], got ", src.sizes());
  FTK_CHECK(dropout >= 0 && dropout < 1, "ftkernels lora_mask_apply: dropout must be in [0, 1), got ", dropout);
  FTK_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1 && seed.device() == src.device(),
            "ftkernels lora_mask_apply: seed must be one int64 on ", src.device(), ", got ", seed.scalar_type(),
            " with ", seed.numel(), " elements on ", seed.device());
  at::Tensor out;
  if (acc.has_value() && acc->defined()) {
    out = *acc;
    FTK_CHECK(out.sizes() == src.sizes() && out.scalar_type() == src.scalar_type() && out.device() == src.device() &&
                  out.is_contiguous(),
              "ftkernels lora_mask_apply: acc must be a contiguous ", src.scalar_type(), " tensor of shape ",
              src.sizes(), " on ", src.device());
  }
  const at::Tensor s = src.contiguous();
  const uint32_t thr = dropout_threshold(dropout);
  if (s.is_cpu()) return lora_mask_apply_cpu(s, seed.item<int64_t>(), thr, scale, out);
#ifdef FTK_WITH_CUDA
  if (s.is_cuda()) return lora_mask_apply_cuda(s, seed, thr, scale, out);
#endif
  FTK_CHECK(false, "ftkernels lora_mask_apply: no kernel for ", src.device(),
            " in this build (CPU always; CUDA when built with a CUDA torch and nvcc)");
  return out;
}

}  // namespace ftk
