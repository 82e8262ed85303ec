// The rebuild of a LoRA layer's input from what its producers keep (the plan is made in Python,
// ftkernels/ops/input_recompute.py, and encoded as a postfix program). One implementation, read by
// the Python autograd Functions and by the C++ node alike, so both rebuild the same bits.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <string>
#include <vector>

#include "ftk/autograd_host.h"
#include "ftk/check.h"

namespace ftk {

bool storage_ok(const at::Tensor& t) {
  const int64_t n = t.numel();
  if (n == 0) return true;
  int64_t end = t.storage_offset() + 1;
  for (int64_t d = 0; d < t.dim(); ++d) end += (t.size(d) - 1) * t.stride(d);
  return static_cast<int64_t>(t.storage().nbytes()) >= end * static_cast<int64_t>(t.element_size());
}

namespace {

at::Tensor layer_norm(const at::Tensor& h, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor* w,
                      const at::Tensor* b) {
  const at::ScalarType acc = mean.scalar_type();  // the statistics' dtype (fp32 for half inputs on GPU)
  auto cast = [&](const at::Tensor& v) { return v.scalar_type() == acc ? v : v.to(acc); };
  // (h - mean) rstd as h rstd - mean rstd: one pass over h, then w and b in one more
  at::Tensor y = at::addcmul(at::mul(mean, rstd).neg_(), cast(h), rstd);
  if (w != nullptr) {
    y = b != nullptr ? at::addcmul(cast(*b), y, cast(*w)) : y.mul_(cast(*w));
  } else if (b != nullptr) {
    y = y.add_(cast(*b));
  }
  return y.scalar_type() == h.scalar_type() ? y : y.to(h.scalar_type());
}

}  // namespace

at::Tensor rebuild_input(const std::vector<int64_t>& program, const std::vector<at::Tensor>& kept) {
  for (const auto& t : kept)
    FTK_CHECK(storage_ok(t),
              "ftkernels: a LoRA layer's input cannot be rebuilt in backward: a tensor its producer kept (",
              t.sizes(), ") has had its storage released since the forward (a sharding wrapper?). Set "
              "FTKERNELS_RECOMPUTE_INPUT=0 to keep LoRA inputs instead.");
  // The producers ran in the dtypes kept; the result is only read by the adapter gradient.
  const at::NoGradGuard no_grad;
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  std::vector<at::Tensor> stack;
  auto pop = [&] {
    FTK_CHECK(!stack.empty(), "ftkernels rebuild_input: malformed program");
    at::Tensor t = std::move(stack.back());
    stack.pop_back();
    return t;
  };
  const size_t n = program.size();
  auto arg = [&](size_t i) {
    FTK_CHECK(i < n, "ftkernels rebuild_input: malformed program");
    return program[i];
  };
  for (size_t i = 0; i < n;) {
    switch (program[i]) {
      case rebuild_op::kTensor: {
        const int64_t k = arg(i + 1);
        FTK_CHECK(k >= 0 && k < static_cast<int64_t>(kept.size()), "ftkernels rebuild_input: tensor ", k,
                  " of ", kept.size());
        stack.push_back(kept[k]);
        i += 2;
        break;
      }
      case rebuild_op::kGelu: {
        at::Tensor a = pop();
        stack.push_back(at::gelu(a, arg(i + 1) ? "tanh" : "none"));
        i += 2;
        break;
      }
      case rebuild_op::kSilu:
        stack.push_back(at::silu(pop()));
        i += 1;
        break;
      case rebuild_op::kMul: {
        at::Tensor r = pop(), l = pop();
        stack.push_back(at::mul(l, r));
        i += 1;
        break;
      }
      case rebuild_op::kTo:
        stack.push_back(pop().to(static_cast<at::ScalarType>(arg(i + 1))));
        i += 2;
        break;
      case rebuild_op::kLayerNorm: {
        const bool has_w = arg(i + 1) != 0, has_b = arg(i + 2) != 0;
        at::Tensor b = has_b ? pop() : at::Tensor(), w = has_w ? pop() : at::Tensor();
        at::Tensor rstd = pop(), mean = pop(), h = pop();
        stack.push_back(layer_norm(h, mean, rstd, has_w ? &w : nullptr, has_b ? &b : nullptr));
        i += 3;
        break;
      }
      default:
        FTK_CHECK(false, "ftkernels rebuild_input: unknown opcode ", program[i]);
    }
  }
  FTK_CHECK(stack.size() == 1, "ftkernels rebuild_input: malformed program");
  return stack[0];
}

}  // namespace ftk
