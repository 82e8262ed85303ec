// The eager-mode autograd node of fused LoRA Linear layers, all in C++: one node for G layers that
// read one x (G = 1: a single layer). A Python autograd.Function costs ~100 us of host time per
// layer step on a slow host (apply, the engine's call back into Python, the Python around each
// ATen call); this node's forward is one call from Python and its backward none (bench/NOTES.md,
// "Session 11"). Kernels: the CPU kernels of csrc/cpu/lora_linear.cpp on CPU (dropout included);
// on other devices the GEMM route: cuBLAS GEMMs, dropout-free the same calls as
// ftkernels/triton/lora_linear.py's cuBLAS route (outputs bit-identical to it; tests/test_lora_node.py),
// with dropout the mask applied by lora_mask_apply around them (where the Python route runs Triton
// kernels that fuse it). The GEMM route also runs on CPU when asked (dense_cpu), so tests check it
// against the CPU kernels.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/strides.h>
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

// y (contiguous [M, N]) in x's leading shape as a tensor of its own, not a view: autograd refuses
// in-place ops (`h += residual`, an in-place activation) on a custom node's output that is a view of a
// tensor made inside it. The 2-D buffer never escapes, so nothing else sees the memory.
at::Tensor unviewed(const at::Tensor& y, at::IntArrayRef shape) {
  return at::empty({0}, y.options()).set_(y.storage(), y.storage_offset(), shape, c10::contiguous_strides(shape));
}

// s (l @ r) as one GEMM: alpha s, beta 0 ignores the uninitialized output.
at::Tensor scaled_mm(const at::Tensor& l, const at::Tensor& r, double s) {
  at::Tensor out = at::empty({l.size(0), r.size(1)}, l.options());
  return at::addmm_out(out, out, l, r, 0.0, s);
}

// x with D's zeros, unscaled (exact): the GEMMs that read it take 1 / (1 - p) as alpha.
at::Tensor masked(const at::Tensor& x, double p, const at::Tensor& seed) {
  return lora_mask_apply(x, seed, p, 1.0, c10::nullopt);
}

// (y, u) of one member on the GEMM route: u = D(x) A^T, y = x W^T + b + s u B^T. D's 1 / (1 - p)
// is the GEMM's alpha, as the Triton kernel scales its fp32 sum.
std::tuple<at::Tensor, at::Tensor> dense_fwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias,
                                             const at::Tensor& a, const at::Tensor& b, double s, double p,
                                             const at::Tensor& seed) {
  at::Tensor u = p > 0 ? scaled_mm(masked(x, p, seed), a.t(), 1.0 / (1.0 - p)) : at::mm(x, a.t());
  at::Tensor y = bias != nullptr ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  y.addmm_(u, b.t(), 1.0, s);
  return {y, u};
}

// (grad_x, grad_A, grad_B) of one member on the GEMM route; grad_x added into gx when defined.
// grad_A = v^T D(x), grad_x = g W + D'(v A) with v = s g B; D is regenerated from the seed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_bwd(const at::Tensor& g, const at::Tensor& x,
                                                         const at::Tensor& w, const at::Tensor& a,
                                                         const at::Tensor& b, const at::Tensor& u, double s,
                                                         double p, const at::Tensor& seed, bool need_x,
                                                         at::Tensor gx) {
  at::Tensor gb = scaled_mm(g.t(), u, s);
  at::Tensor v = scaled_mm(g, b, s);
  if (need_x) gx = gx.defined() ? gx.addmm_(g, w) : at::mm(g, w);
  if (p == 0) {
    at::Tensor ga = at::mm(v.t(), x);
    if (need_x) gx.addmm_(v, a);
    return {gx, ga, gb};
  }
  const double inv_keep = 1.0 / (1.0 - p);
  at::Tensor xm = masked(x, p, seed);
  at::Tensor ga = scaled_mm(v.t(), xm, inv_keep);
  // grad_x += D'(v A), v A written over the masked x (one [M, K] temporary, not two)
  if (need_x) lora_mask_apply(at::mm_out(xm, v, a), seed, p, inv_keep, gx);
  return {gx, ga, gb};
}

// Whether t is vmap-batched: a backward run under vmap (autograd.grad(is_grads_batched=True) and
// jacobian(vectorize=True) use the legacy vmap, torch.func.vmap over autograd.grad functorch's) hands the
// node batched grads, on which out= ops and our kernels cannot run.
bool batched(const at::Tensor& t) {
  return t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Batched, c10::DispatchKey::FuncTorchBatched}));
}

// dense_bwd's math in plain ATen ops for a batched g: D as a multiply by its scaled mask over x's
// shape (each batch entry is a whole gradient of y, so the mask is the forward's).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_bwd(const at::Tensor& g, const at::Tensor& x,
                                                           const at::Tensor& w, const at::Tensor& a,
                                                           const at::Tensor& b, const at::Tensor& u, double s,
                                                           double p, const at::Tensor& seed, bool need_x,
                                                           const at::Tensor& gx) {
  at::Tensor gb = at::mm(g.t(), u).mul(s);
  at::Tensor v = at::mm(g, b).mul(s);
  at::Tensor keep;  // 1 / (1 - p) where D keeps an element of x, else 0
  if (p > 0) keep = lora_mask_apply(at::ones_like(x), seed, p, 1.0 / (1.0 - p), c10::nullopt);
  at::Tensor ga = at::mm(v.t(), p > 0 ? x * keep : x);
  at::Tensor gxi;
  if (need_x) {
    at::Tensor va = at::mm(v, a);
    gxi = at::mm(g, w) + (p > 0 ? va * keep : va);
    if (gx.defined()) gxi = gx + gxi;
  }
  return {gxi, ga, gb};
}

}  // namespace

// Named outside the anonymous namespace: grad_fn.name() shows torch::autograd::CppNode<ftk::LoRALinearNode>.
struct LoRALinearNode : public torch::autograd::Function<LoRALinearNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, at::TensorList lora_as, at::TensorList lora_bs,
                               const std::vector<int64_t>& bias_of, const std::vector<double>& scalings,
                               const std::vector<double>& dropouts, const std::vector<at::Tensor>& seeds,
                               const std::vector<at::Tensor>& kept, const std::vector<int64_t>& program,
                               bool dense_cpu) {
    // The caller chose the compute dtype (autocast's included): the GEMMs run in it.
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const int64_t G = static_cast<int64_t>(weights.size()), K = x.size(-1);
    const bool cpu = x.is_cpu() && !dense_cpu;  // the CPU kernels, else the GEMM route
    const at::ScalarType dt = x.scalar_type();
    const at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, K});
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
        const int64_t seed = dropouts[i] > 0 ? seeds[i].item<int64_t>() : 0;
        std::tie(y, u) = lora_linear_fwd_cpu(x2, w, bias ? c10::optional<at::Tensor>(*bias) : c10::nullopt, a, b,
                                             scalings[i], dropouts[i], seed);
      } else {
        std::tie(y, u) = dense_fwd(x2, w, bias, a, b, scalings[i], dropouts[i], seeds[i]);
      }
      out_shape.back() = w.size(0);
      ys.push_back(x.dim() == 2 ? y : unviewed(y.contiguous(), out_shape));
      to_save.insert(to_save.end(), {w, a, b, u});
    }
    ctx->save_for_backward(to_save);  // x or the kept tensors, then w, A, B, u per member
    ctx->saved_data["program"] = program;
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["bias_of"] = bias_of;
    ctx->saved_data["scalings"] = scalings;
    ctx->saved_data["dropouts"] = dropouts;
    ctx->saved_data["seeds"] = seeds;  // int64 scalars (on the GPU: read by the kernels, no sync)
    ctx->saved_data["cpu"] = cpu;
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
    // The error node also takes the incoming grads (their graph leads to x and to the layers above)
    // and the saved tensors that require grad (A, B): without these edges grads of grads w.r.t. them
    // found no path ("not used in the graph", or a silent None with allow_unused=True); with them they
    // reach the node and raise.
    const size_t n_out = marked.size();
    for (const auto& t : grads) {
      if (t.defined() && t.requires_grad()) marked.push_back(t);
    }
    for (const auto& t : ctx->get_saved_variables()) {
      if (t.defined() && t.requires_grad()) marked.push_back(t);
    }
    variable_list res = torch::autograd::DelayedError(
                            "ftkernels LoRA node: trying to differentiate twice (the node's backward is first-order; "
                            "run the forward inside `with ftkernels.plain_ops():` for grads of grads)",
                            static_cast<int64_t>(marked.size()))
                            .apply(std::move(marked));
    res.resize(n_out);
    return res;
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
    const std::vector<at::Tensor> seeds = ctx->saved_data["seeds"].toTensorVector();
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
    const bool cpu = ctx->saved_data["cpu"].toBool();
    const bool need_x = ctx->needs_input_grad(0);
    variable_list out(1 + G + nb + 2 * G + 7);  // tensors, then 7 non-tensor args
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
        if (batched(g)) {
          std::tie(gxi, ga, gb) = batched_bwd(g, x2, w, a, b, u, scalings[i], dropouts[i], seeds[i], need_x, gx);
        } else if (cpu) {
          const int64_t seed = dropouts[i] > 0 ? seeds[i].item<int64_t>() : 0;
          std::tie(gxi, ga, gb) = lora_linear_bwd_cpu(g, x2, w, a, b, u, scalings[i], dropouts[i], seed, need_x,
                                                      gx.defined() ? c10::optional<at::Tensor>(gx) : c10::nullopt);
        } else {
          std::tie(gxi, ga, gb) = dense_bwd(g, x2, w, a, b, u, scalings[i], dropouts[i], seeds[i], need_x, gx);
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
                                         const std::vector<int64_t>& program, bool dense_cpu) {
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
                               at::TensorList(lora_bs), bias_of, scalings, dropouts, seeds, kept, program, dense_cpu);
}

}  // namespace ftk
