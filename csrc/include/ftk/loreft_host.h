// Host entry points of the fused LoReFT intervention (CPU kernel in csrc/cpu/loreft.cpp).
#pragma once
#include <torch/types.h>
#include "check.h"

#include <tuple>

namespace ftk {

// out = D(h + s R) with s = h (W - R)^T + b; h [M, d], R and W [r, d], b [r] (R, W, b of any one
// floating dtype, converted to h's accumulation dtype); D is the LoRA dropout
// stream over out's [M, d] (kept values scaled by 1 / (1 - p)). Returns (out [M, d] in h's dtype,
// s [M, r] in the accumulation dtype: fp32, fp64 for fp64).
std::tuple<at::Tensor, at::Tensor> loreft_fwd_cpu(const at::Tensor& h, const at::Tensor& rot, const at::Tensor& w,
                                                  const at::Tensor& b, double dropout, int64_t seed);

// With gd = D(g) and t = gd R^T: grad_h = gd + t (W - R), grad_W = t^T h, grad_b = sum_rows t,
// grad_R = s^T gd - t^T h. Returns (grad_h [M, d] in h's dtype, grad_R, grad_W [r, d], grad_b [r] in
// R's dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> loreft_bwd_cpu(const at::Tensor& grad, const at::Tensor& h,
                                                                          const at::Tensor& rot, const at::Tensor& w,
                                                                          const at::Tensor& s, double dropout,
                                                                          int64_t seed);

}  // namespace ftk
