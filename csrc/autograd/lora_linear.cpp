// The eager-mode autograd node of fused LoRA Linear layers, all in C++: one node for G layers that
// read one x (G = 1: a single layer). A Python autograd.Function costs ~100 us of host time per
// layer step on a slow host (apply, the engine's call back into Python, the Python around each
// ATen call); this node's forward is one call from Python and its backward none (bench/NOTES.md,
// "Session 11"). Kernels: the CPU kernels of csrc/cpu/lora_linear.cpp on CPU (dropout included);
// on other devices dropout-free cuBLAS GEMMs, the same calls as ftkernels/triton/lora_linear.py's
// cuBLAS route (outputs bit-identical to it; tests/test_lora_node.py). Dropout on a GPU runs Triton
// kernels, launched from Python: such calls do not come here.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <algorithm>
#include <string>
#include <vector>

#include "ftk/autograd_host.h"
#include "ftk/check.h"
#include "ftk/lora_host.h"

namespace ftk {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType d) { return t.scalar_type() == d ? t : t.to(d); }

// (y, u) of one member, dropout-free, off CPU: u = x A^T, y = x W^T + b + s u B^T.
std::tuple<at::Tensor, at::Tensor> dense_fwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias,
                                             const at::Tensor& a, const at::Tensor& b, double s) {
  at::Tensor u = at::mm(x, a.t());
  at::Tensor y = bias != nullptr ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  y.addmm_(u, b.t(), 1.0, s);
  return {y, u};
}

// (grad_x, grad_A, grad_B) of one member, dropout-free, off CPU; grad_x added into gx when defined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_bwd(const at::Tensor& g, const at::Tensor& x,
                                                         const at::Tensor& w, const at::Tensor& a,
                                                         const at::Tensor& b, const at::Tensor& u, double s,
                                                         bool need_x, at::Tensor gx) {
  // s g^T u and s g B as single GEMMs (alpha s, beta 0 ignores the uninitialized output)
  at::Tensor gb = at::empty({g.size(1), u.size(1)}, g.options());
  at::addmm_out(gb, gb, g.t(), u, 0.0, s);
  at::Tensor v = at::empty({g.size(0), b.size(1)}, g.options());
  at::addmm_out(v, v, g, b, 0.0, s);
  if (need_x) gx = gx.defined() ? gx.addmm_(g, w) : at::mm(g, w);
  at::Tensor ga = at::mm(v.t(), x);
  if (need_x) gx.addmm_(v, a);
  return {gx, ga, gb};
}

}  // namespace

// Named outside the anonymous namespace: grad_fn.name() shows torch::autograd::CppNode<ftk::LoRALinearNode>.
struct LoRALinearNode : public torch::autograd::Function<LoRALinearNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, at::TensorList lora_as, at::TensorList lora_bs,
                               const std::vector<int64_t>& bias_of, const std::vector<double>& scalings,
                               const std::vector<double>& dropouts, const std::vector<at::Tensor>& seeds,
                               const std::vector<at::Tensor>& kept, const std::vector<int64_t>& program) {
    // The caller chose the compute dtype (autocast's included): the GEMMs run in it.
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const int64_t G = static_cast<int64_t>(weights.size()), K = x.size(-1);
    const bool cpu = x.is_cpu();
    const at::ScalarType dt = x.scalar_type();
    const at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, K});
    std::vector<int64_t> seed_ints(G, 0);
    variable_list ys, to_save;
    if (program.empty())
      to_save.push_back(x2);
    else
      to_save.insert(to_save.end(), kept.begin(), kept.end());
    std::vector<int64_t> out_shape = x.sizes().vec();
    for (int64_t i = 0; i < G; ++i) {
      const at::Tensor& w = weights[i];
      const at::Tensor* bias = bias_of[i] >= 0 ? &biases[bias_of[i]] : nullptr;
      // cast once: backward reuses the r-row copies
      const at::Tensor a = as_dtype(lora_as[i], dt), b = as_dtype(lora_bs[i], dt);
      at::Tensor y, u;
      if (cpu) {
        if (dropouts[i] > 0) seed_ints[i] = seeds[i].item<int64_t>();
        std::tie(y, u) = lora_linear_fwd_cpu(x2, w, bias ? c10::optional<at::Tensor>(*bias) : c10::nullopt, a, b,
                                             scalings[i], dropouts[i], seed_ints[i]);
      } else {
        FTK_CHECK(dropouts[i] == 0, "ftkernels lora_linear_node: dropout on ", x.device().str(),
                  " runs in the Triton kernels, not in this node");
        std::tie(y, u) = dense_fwd(x2, w, bias, a, b, scalings[i]);
      }
      out_shape.back() = w.size(0);
      ys.push_back(x.dim() == 2 ? y : y.view(out_shape));
      to_save.insert(to_save.end(), {w, a, b, u});
    }
    ctx->save_for_backward(to_save);  // x or the kept tensors, then w, A, B, u per member
    ctx->saved_data["program"] = program;
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["bias_of"] = bias_of;
    ctx->saved_data["scalings"] = scalings;
    ctx->saved_data["dropouts"] = dropouts;
    ctx->saved_data["seeds"] = seed_ints;
    ctx->saved_data["adapter_dtypes"] = [&] {
      std::vector<int64_t> d;
      for (int64_t i = 0; i < G; ++i) {
        d.push_back(static_cast<int64_t>(lora_as[i].scalar_type()));
        d.push_back(static_cast<int64_t>(lora_bs[i].scalar_type()));
      }
      return d;
    }();
    ctx->set_materialize_grads(false);  // an unused output's grad stays undefined: its member is skipped
    return ys;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // create_graph=True: the grads are computed as usual and marked, as Python's
    // once_differentiable does, so that differentiating them again raises instead of giving 0.
    const bool twice = at::GradMode::is_enabled();
    variable_list out = grads_of(ctx, grads);
    if (!twice) return out;
    variable_list marked;
    for (auto& t : out) {
      if (t.defined()) {
        t = t.detach();
        t.set_requires_grad(true);
      }
      marked.push_back(t);
    }
    return torch::autograd::DelayedError(
               "ftkernels LoRA node: trying to differentiate twice (the node's backward is first-order)",
               static_cast<int64_t>(marked.size()))
        .apply(std::move(marked));
  }

  static variable_list grads_of(AutogradContext* ctx, const variable_list& grads) {
    const at::NoGradGuard no_grad;
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> program = ctx->saved_data["program"].toIntVector();
    const std::vector<int64_t> x_shape = ctx->saved_data["x_shape"].toIntVector();
    const std::vector<int64_t> bias_of = ctx->saved_data["bias_of"].toIntVector();
    const std::vector<double> scalings = ctx->saved_data["scalings"].toDoubleVector();
    const std::vector<double> dropouts = ctx->saved_data["dropouts"].toDoubleVector();
    const std::vector<int64_t> seeds = ctx->saved_data["seeds"].toIntVector();
    const std::vector<int64_t> adtypes = ctx->saved_data["adapter_dtypes"].toIntVector();
    const int64_t G = static_cast<int64_t>(scalings.size()), K = x_shape.back();
    const int64_t n_kept = static_cast<int64_t>(saved.size()) - 4 * G;  // x itself, or the rebuild's tensors
    const int64_t nb = std::count_if(bias_of.begin(), bias_of.end(), [](int64_t j) { return j >= 0; });
    at::Tensor x2;
    if (program.empty()) {
      x2 = saved[0];
    } else {  // x was not kept: rebuilt from its producers' tensors (before their backward frees them)
      x2 = rebuild_input(program, std::vector<at::Tensor>(saved.begin(), saved.begin() + n_kept));
      x2 = x2.reshape({-1, K});
    }
    const bool cpu = x2.is_cpu();
    const bool need_x = ctx->needs_input_grad(0);
    variable_list out(1 + G + nb + 2 * G + 6);
    at::Tensor gx;
    for (int64_t i = 0; i < G; ++i) {
      if (!grads[i].defined()) continue;  // an unused output
      const at::Tensor& w = saved[n_kept + 4 * i];
      const at::Tensor &a = saved[n_kept + 4 * i + 1], &b = saved[n_kept + 4 * i + 2], &u = saved[n_kept + 4 * i + 3];
      const at::Tensor g = grads[i].reshape({-1, w.size(0)}).contiguous();
      const size_t iw = 1 + i, ia = 1 + G + nb + i, ib = 1 + 2 * G + nb + i;
      const bool need_a = ctx->needs_input_grad(ia), need_b = ctx->needs_input_grad(ib);
      if (need_x || need_a || need_b) {
        at::Tensor gxi, ga, gb;
        if (cpu) {
          std::tie(gxi, ga, gb) = lora_linear_bwd_cpu(g, x2, w, a, b, u, scalings[i], dropouts[i], seeds[i], need_x,
                                                      gx.defined() ? c10::optional<at::Tensor>(gx) : c10::nullopt);
        } else {
          std::tie(gxi, ga, gb) = dense_bwd(g, x2, w, a, b, u, scalings[i], need_x, gx);
        }
        if (need_x) gx = gxi;  // the first member's buffer; later members add into it
        if (need_a) out[ia] = as_dtype(ga, static_cast<at::ScalarType>(adtypes[2 * i]));
        if (need_b) out[ib] = as_dtype(gb, static_cast<at::ScalarType>(adtypes[2 * i + 1]));
      }
      if (ctx->needs_input_grad(iw)) out[iw] = at::mm(g.t(), x2);  // an unfrozen base weight: g^T x
      if (bias_of[i] >= 0 && ctx->needs_input_grad(1 + G + bias_of[i])) out[1 + G + bias_of[i]] = g.sum(0);
    }
    if (gx.defined()) out[0] = gx.view(x_shape);
    return out;
  }
};

std::vector<at::Tensor> lora_linear_node(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                         const std::vector<at::Tensor>& biases,
                                         const std::vector<at::Tensor>& lora_as,
                                         const std::vector<at::Tensor>& lora_bs, const std::vector<int64_t>& bias_of,
                                         const std::vector<double>& scalings, const std::vector<double>& dropouts,
                                         const std::vector<at::Tensor>& seeds, const std::vector<at::Tensor>& kept,
                                         const std::vector<int64_t>& program) {
  const size_t G = weights.size();
  FTK_CHECK(G >= 1 && lora_as.size() == G && lora_bs.size() == G && bias_of.size() == G && scalings.size() == G &&
                dropouts.size() == G && seeds.size() == G,
            "ftkernels lora_linear_node: one weight, A, B, bias index, scaling, dropout and seed per member");
  FTK_CHECK(x.dim() >= 1 && x.size(-1) > 0, "ftkernels lora_linear_node: x must be [..., K]");
  for (size_t i = 0; i < G; ++i) {
    FTK_CHECK(weights[i].scalar_type() == x.scalar_type() && weights[i].dim() == 2 &&
                  weights[i].size(1) == x.size(-1),
              "ftkernels lora_linear_node: weight ", i, " must be [N, ", x.size(-1), "] in x's dtype");
    FTK_CHECK(bias_of[i] >= -1 && bias_of[i] < static_cast<int64_t>(biases.size()),
              "ftkernels lora_linear_node: bias index out of range");
  }
  return LoRALinearNode::apply(x, at::TensorList(weights), at::TensorList(biases), at::TensorList(lora_as),
                               at::TensorList(lora_bs), bias_of, scalings, dropouts, seeds, kept, program);
}

}  // namespace ftk
