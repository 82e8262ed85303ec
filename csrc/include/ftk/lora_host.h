// Host entry points of the LoRA ops (CPU kernels in csrc/cpu/lora_linear.cpp, lora_dropout.cpp).
#pragma once
#include <torch/types.h>
#include "check.h"

#include <tuple>

namespace ftk {

// y = x W^T + b + s * u B^T with u = D(x) A^T; returns (y [M, N], u [M, r]).
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                       const at::Tensor& lora_b, double scaling, double dropout,
                                                       int64_t seed);

// grad_x = g W + D'(v A) (when need_x), grad_A = v^T D(x), grad_B = s g^T u, with v = s g B;
// returns (grad_x or an empty tensor, grad_A [r, K], grad_B [N, r]). With grad_x_acc (contiguous,
// x's shape and dtype), grad_x is added into it in place and it is returned as grad_x.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& lora_a,
                                                                   const at::Tensor& lora_b, const at::Tensor& u,
                                                                   double scaling, double dropout, int64_t seed,
                                                                   bool need_x,
                                                                   const c10::optional<at::Tensor>& grad_x_acc);

// D(x): x with the LoRA dropout stream applied over its logical [numel / K, K] view, kept values
// scaled by 1 / (1 - p); same memory format as x (csrc/cpu/lora_dropout.cpp).
at::Tensor lora_dropout_cpu(const at::Tensor& x, double dropout, int64_t seed);

// The LoRA dropout mask applied to a 2-D src [M, K] (the stream of ftk/lora.h, element (m, k)):
// m_k(src) = keep ? src * scale : 0, returned as a new tensor, or, given acc (src's shape, dtype and
// device, contiguous), added into acc in place (acc returned). seed: an int64 scalar tensor on src's
// device (read on the device: no host sync). The C++ LoRA node's GEMM route uses it: the masked x
// (scale 1) feeds cuBLAS, and the masked rank-r product (scale 1 / (1 - p)) is added into grad_x.
at::Tensor lora_mask_apply(const at::Tensor& src, const at::Tensor& seed, double dropout, double scale,
                           const c10::optional<at::Tensor>& acc);
at::Tensor lora_mask_apply_cpu(const at::Tensor& src, int64_t seed, uint32_t thr, double scale, at::Tensor acc);
#ifdef FTK_WITH_CUDA
at::Tensor lora_mask_apply_cuda(const at::Tensor& src, const at::Tensor& seed, uint32_t thr, double scale,
                                at::Tensor acc);
#endif

}  // namespace ftk
