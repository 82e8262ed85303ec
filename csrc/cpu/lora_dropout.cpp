// D(x) of the LoRA dropout stream (ftk/lora.h) for a tensor of any memory format: element
// (i0, ..., i_{d-2}, k) is element (row, k) of x's logical [numel / K, K] view (row-major over the
// leading dims), so NCHW and channels-last inputs get the same mask. Used by LoRA layers whose
// low-rank path is an ATen op (convolutions): the dropped copy lives only while that op runs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "ftk/lora.h"
#include "ftk/lora_host.h"

namespace ftk {

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
        philox_dropout_block(static_cast<uint64_t>(seed), kLoraStream, lora_dropout_group(row, 0),
                             static_cast<int>((K + 7) / 8), draws.data());
        for (int64_t k = 0; k < K; ++k) {
          const acc_t v = draws[k] >= thr ? static_cast<acc_t>(xp[xo + k * xsk]) * inv_keep : acc_t(0);
          op[oo + k * osk] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return out;
}

}  // namespace ftk
