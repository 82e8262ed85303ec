// Host-side argument bundle and checks of the fused optimizer step, shared by the CPU and CUDA
// entry points (they differ only in how they walk the elements).
#pragma once
#include <ATen/ATen.h>
#include "check.h"

#include <optional>
#include <vector>

#include "optimizer.h"

namespace ftk {

using OptTensor = std::optional<at::Tensor>;
using OptTensorList = std::vector<OptTensor>;

// Everything one fused step of one param group needs. Lists are parallel, one entry per param
// with a gradient; optional entries are None where a param has no such tensor.
struct OptimArgs {
  OptimHyper hyper;
  std::vector<at::Tensor> params, grads;
  std::vector<at::Tensor> steps;  // float32 scalars on the param's device; the op adds 1 unless skipped
  OptTensorList s1, s2, s3, masks, anchors, fishers, masters;
  // Compact state (ftkernels/optim/_compact.py): int32/int64 flat indices of the kept elements.
  // With them, the state slots hold those n elements only, and state element k updates param
  // (and grad, anchor, Fisher) element idx[k]: the kernel gathers and scatters through them.
  OptTensorList indices;
  std::vector<int64_t> tensor_ids;  // stable ids for the dropout RNG stream of each tensor
  OptTensor lr, grad_scale, skip, total_norm;  // 0-dim float tensors; skip != 0 skips the step
  int64_t seed = 0;
  // CUDA only: the seed as an int64 scalar on the params' device, read by the kernel instead of
  // `seed` (a CUDA graph replays a host value frozen; a device draw advances with each replay).
  OptTensor seed_tensor;
};

inline const at::Tensor* get(const OptTensorList& l, size_t i) {
  return (i < l.size() && l[i].has_value() && l[i]->defined()) ? &*l[i] : nullptr;
}

// Memory-safety checks (user-facing validation with friendly messages lives in Python).
inline void check_optim_args(const OptimArgs& a) {
  const size_t n = a.params.size();
  FTK_CHECK(a.grads.size() == n && a.steps.size() == n && a.tensor_ids.size() == n,
            "ftkernels: fused optimizer step got lists of different lengths");
  for (const OptTensorList* l :
       {&a.s1, &a.s2, &a.s3, &a.masks, &a.anchors, &a.fishers, &a.masters, &a.indices})
    FTK_CHECK(l->empty() || l->size() == n, "ftkernels: fused optimizer step got lists of different lengths");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    FTK_CHECK(p.is_non_overlapping_and_dense(), "ftkernels: param ", i, " must be dense");
    auto same_layout = [&](const at::Tensor& t, const char* what) {
      FTK_CHECK(t.device() == p.device(), "ftkernels: ", what, " of param ", i, " is on ", t.device(),
                ", param on ", p.device());
      FTK_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), "ftkernels: ", what, " of param ", i,
                " must have the param's shape and strides");
    };
    same_layout(a.grads[i], "grad");
    FTK_CHECK(a.grads[i].scalar_type() == p.scalar_type(), "ftkernels: grad dtype differs from param ", i);
    for (const OptTensorList* l : {&a.anchors, &a.fishers})
      if (const at::Tensor* t = get(*l, i)) same_layout(*t, "anchor/Fisher");
    const at::Tensor* idx = get(a.indices, i);
    if (idx) {  // compact: flat state of the index's length; params indexed in memory order
      FTK_CHECK((idx->scalar_type() == at::kInt || idx->scalar_type() == at::kLong) && idx->dim() == 1 &&
                    idx->is_contiguous() && idx->device() == p.device() && idx->numel() <= p.numel(),
                "ftkernels: compact index of param ", i, " must be a 1-D int32/int64 tensor on its device");
      FTK_CHECK(p.is_contiguous(), "ftkernels: a param with compact state must be contiguous");
      FTK_CHECK(!get(a.masks, i) && !get(a.masters, i) && a.hyper.grad_dropout == 0,
                "ftkernels: compact state excludes masks, master weights and gradient dropout");
      for (const OptTensorList* l : {&a.s1, &a.s2, &a.s3})
        if (const at::Tensor* t = get(*l, i))
          FTK_CHECK(t->device() == p.device() && t->is_contiguous() && t->numel() == idx->numel(),
                    "ftkernels: compact state of param ", i, " must hold one element per index");
    } else {
      for (const OptTensorList* l : {&a.s1, &a.s2, &a.s3, &a.masters})
        if (const at::Tensor* t = get(*l, i)) same_layout(*t, "state");
    }
    if (const at::Tensor* m = get(a.masters, i))
      FTK_CHECK(m->scalar_type() == at::kFloat, "ftkernels: master weights must be float32");
    if (const at::Tensor* m = get(a.masks, i)) {
      FTK_CHECK(m->scalar_type() == at::kByte && m->is_contiguous() && m->device() == p.device() &&
                    m->numel() == (p.numel() + 7) / 8,
                "ftkernels: mask of param ", i, " must be packed bits (uint8, ceil(numel/8)) on its device");
    }
    FTK_CHECK(a.steps[i].numel() == 1 && a.steps[i].scalar_type() == at::kFloat,
              "ftkernels: step of param ", i, " must be a float32 scalar tensor");
  }
  const int k = a.hyper.kind;
  FTK_CHECK(k >= kAdamW && k <= kRMSprop, "ftkernels: unknown optimizer kind ", k);
}

void fused_optim_step_cpu(const OptimArgs& a);
#ifdef FTK_WITH_CUDA
// Returns the host buffers a CUDA graph being captured reads at each replay (the caller keeps them
// alive as long as the graph); empty outside capture.
std::vector<at::Tensor> fused_optim_step_cuda(const OptimArgs& a);
#endif

}  // namespace ftk
