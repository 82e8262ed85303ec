// The update rules of the fused optimizers, written once for the CPU kernel (scalars and
// at::vec::Vectorized) and the CUDA kernel (scalars). T is the working type: float or double,
// or a SIMD vector of them; every operation used on T is + - * / and the helpers below.
#pragma once
#include "macros.h"

namespace ftk {

enum OptKind : int { kAdamW = 0, kSGD = 1, kAdagrad = 2, kRMSprop = 3 };

// Hyper-parameters of one param group for one step (host-filled, passed by value to kernels).
struct OptimHyper {
  int kind = kAdamW;
  double lr = 1e-3;  // used when no lr tensor is given
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.0;  // AdamW: decoupled; SGD/Adagrad/RMSprop: coupled, as in torch.optim
  double l1 = 0.0, l2 = 0.0, l2sp = 0.0, ewc = 0.0;
  double grad_dropout = 0.0;
  double momentum = 0.0, dampening = 0.0;
  double lr_decay = 0.0;  // Adagrad
  double alpha = 0.99;    // RMSprop smoothing constant
  double max_grad_norm = 0.0;  // <= 0: no clipping
  bool amsgrad = false, maximize = false, nesterov = false, centered = false;
};

// Constants of one tensor for one step, derived from the group's hyper-parameters, the (possibly
// device-resident) lr, this tensor's step count, the AMP scale and the global grad norm.
struct StepConsts {
  double lr;
  double gscale;      // sign(maximize) / grad_scale * clip coefficient
  double decay;       // AdamW decoupled decay factor 1 - lr*wd; 1 otherwise
  double coupled_l2;  // l2, plus weight_decay for the optimizers where it is coupled
  double step_size;   // AdamW: lr / (1 - beta1^t); Adagrad: lr / (1 + (t-1) lr_decay); else lr
  double inv_bc2_sqrt;  // AdamW: 1 / sqrt(1 - beta2^t) (a multiply, not a divide, per element)
  double keep_scale;  // gradient dropout: 1 / (1 - p)
  double l1_thresh;   // proximal L1: lr * l1
  bool first_step;    // SGD: momentum buffer starts as the gradient
};

// total_norm < 0 means no clipping; inv_grad_scale = 1 without AMP.
FTK_HD StepConsts make_step_consts(const OptimHyper& h, double lr, double step, double inv_grad_scale,
                                   double total_norm) {
  StepConsts c;
  double clip = 1.0;
  if (h.max_grad_norm > 0 && total_norm >= 0) {
    // torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1.
    double coef = h.max_grad_norm / (total_norm + 1e-6);
    clip = coef < 1.0 ? coef : 1.0;
  }
  c.lr = lr;
  c.gscale = (h.maximize ? -1.0 : 1.0) * inv_grad_scale * clip;
  const bool decoupled = h.kind == kAdamW;
  c.decay = decoupled ? 1.0 - lr * h.weight_decay : 1.0;
  c.coupled_l2 = h.l2 + (decoupled ? 0.0 : h.weight_decay);
  c.step_size = lr;
  c.inv_bc2_sqrt = 1.0;
  if (h.kind == kAdamW) {
    c.step_size = lr / (1.0 - pow(h.beta1, step));
    c.inv_bc2_sqrt = 1.0 / sqrt(1.0 - pow(h.beta2, step));
  } else if (h.kind == kAdagrad) {
    c.step_size = lr / (1.0 + (step - 1.0) * h.lr_decay);
  }
  c.keep_scale = h.grad_dropout > 0 ? 1.0 / (1.0 - h.grad_dropout) : 1.0;
  c.l1_thresh = lr * h.l1;
  c.first_step = step <= 1.0;
  return c;
}

// Element helpers: scalar overloads here; SIMD types use their own sqrt()/maximum()/minimum().
FTK_HD float vsqrt(float x) { return sqrtf(x); }
FTK_HD double vsqrt(double x) { return sqrt(x); }
FTK_HD float vmax(float a, float b) { return a > b ? a : b; }
FTK_HD double vmax(double a, double b) { return a > b ? a : b; }
FTK_HD float vmin(float a, float b) { return a < b ? a : b; }
FTK_HD double vmin(double a, double b) { return a < b ? a : b; }
template <class V>
inline V vsqrt(const V& x) { return x.sqrt(); }
template <class V>
inline V vmax(const V& a, const V& b) { return maximum(a, b); }
template <class V>
inline V vmin(const V& a, const V& b) { return minimum(a, b); }

// A constant in T's precision: float for fp32 work (and fp32 SIMD), double for fp64 work.
template <class T>
struct ScalarOf {
  using type = typename T::value_type;  // at::vec::Vectorized<S>
};
template <>
struct ScalarOf<float> {
  using type = float;
};
template <>
struct ScalarOf<double> {
  using type = double;
};
template <class T>
FTK_HD T cst(double x) {
  return T(static_cast<typename ScalarOf<T>::type>(x));
}

// The rule's constants in the working type T, converted once per tensor and step (CPU: per work
// item; CUDA: per block, in shared memory). The element loop then holds no double math, no
// conversions and no broadcasts: on CPU those kept the AdamW loop at 2x torch's time (session 13).
// Each value is the same double expression rounded to T as before, so results are unchanged.
template <class T>
struct RuleConsts {
  T gscale, coupled_l2, l2sp, ewc, decay;
  T one_m_beta1, beta2, one_m_beta2, inv_bc2_sqrt, eps, step_size, lr;
  T momentum, one_m_dampening, alpha, one_m_alpha, l1_thresh, neg_l1_thresh;
  bool scale, dropout, coupled, reg, decays, amsgrad, nesterov, centered, momentum_nz, momentum_pos, l1,
      first_step;
};

template <class T>
FTK_HD RuleConsts<T> rule_consts(const OptimHyper& h, const StepConsts& c) {
  RuleConsts<T> k;
  k.gscale = cst<T>(c.gscale);
  k.coupled_l2 = cst<T>(c.coupled_l2);
  k.l2sp = cst<T>(h.l2sp);
  k.ewc = cst<T>(h.ewc);
  k.decay = cst<T>(c.decay);
  k.one_m_beta1 = cst<T>(1.0 - h.beta1);
  k.beta2 = cst<T>(h.beta2);
  k.one_m_beta2 = cst<T>(1.0 - h.beta2);
  k.inv_bc2_sqrt = cst<T>(c.inv_bc2_sqrt);
  k.eps = cst<T>(h.eps);
  k.step_size = cst<T>(c.step_size);
  k.lr = cst<T>(c.lr);
  k.momentum = cst<T>(h.momentum);
  k.one_m_dampening = cst<T>(1.0 - h.dampening);
  k.alpha = cst<T>(h.alpha);
  k.one_m_alpha = cst<T>(1.0 - h.alpha);
  k.l1_thresh = cst<T>(c.l1_thresh);
  k.neg_l1_thresh = cst<T>(0.0) - k.l1_thresh;
  k.scale = c.gscale != 1.0;
  k.dropout = h.grad_dropout > 0;
  k.coupled = c.coupled_l2 != 0.0;
  k.reg = h.l2sp != 0 || h.ewc != 0;
  k.decays = c.decay != 1.0;
  k.amsgrad = h.amsgrad;
  k.nesterov = h.nesterov;
  k.centered = h.centered;
  k.momentum_nz = h.momentum != 0;  // SGD's test, as torch.optim.SGD
  k.momentum_pos = h.momentum > 0;  // RMSprop's test, as torch.optim.RMSprop
  k.l1 = h.l1 != 0;
  k.first_step = c.first_step;
  return k;
}

// One element (or one SIMD vector of elements) of a fused step.
//   k      the step's constants in T (rule_consts)
//   p      parameter in working precision (the fp32 master copy when there is one)
//   g      raw gradient as stored (still AMP-scaled, unclipped)
//   s1..s3 optimizer state: AdamW (exp_avg, exp_avg_sq, max_exp_avg_sq); SGD (momentum_buffer);
//          Adagrad (sum); RMSprop (square_avg, momentum_buffer, grad_avg)
//   anchor, fisher  L2-SP / EWC pull target and Fisher diagonal (read only when enabled)
//   drop   gradient-dropout multiplier: 0 or 1/(1-p) (read only when grad_dropout > 0)
// Order: g <- g * gscale (unscale, clip, maximize); g <- drop * g (Child-Tuning-F drops the task
// gradient only); g += l2 p + (l2sp + ewc F)(p - anchor); optimizer rule; L1 soft-threshold.
template <int KIND, class T>
FTK_HD void optim_update(const RuleConsts<T>& k, T& p, T g, T& s1, T& s2, T& s3, T anchor, T fisher, T drop) {
  if (k.scale) g = g * k.gscale;
  if (k.dropout) g = g * drop;
  if (k.coupled) g = g + k.coupled_l2 * p;
  if (k.reg) g = g + (k.l2sp + k.ewc * fisher) * (p - anchor);

  if constexpr (KIND == kAdamW) {
    if (k.decays) p = p * k.decay;
    s1 = s1 + (g - s1) * k.one_m_beta1;  // torch: exp_avg.lerp_(g, 1-beta1)
    s2 = s2 * k.beta2 + g * g * k.one_m_beta2;
    T v = s2;
    if (k.amsgrad) {
      s3 = vmax(s3, s2);
      v = s3;
    }
    T denom = vsqrt(v) * k.inv_bc2_sqrt + k.eps;
    p = p - k.step_size * (s1 / denom);
  } else if constexpr (KIND == kSGD) {
    if (k.momentum_nz) {
      s1 = k.first_step ? g : s1 * k.momentum + g * k.one_m_dampening;
      g = k.nesterov ? g + k.momentum * s1 : s1;
    }
    p = p - k.lr * g;
  } else if constexpr (KIND == kAdagrad) {
    s1 = s1 + g * g;
    p = p - k.step_size * (g / (vsqrt(s1) + k.eps));
  } else {  // RMSprop
    s1 = s1 * k.alpha + g * g * k.one_m_alpha;
    T avg;
    if (k.centered) {
      s3 = s3 + (g - s3) * k.one_m_alpha;
      avg = vsqrt(s1 - s3 * s3) + k.eps;
    } else {
      avg = vsqrt(s1) + k.eps;
    }
    if (k.momentum_pos) {
      s2 = s2 * k.momentum + g / avg;
      p = p - k.lr * s2;
    } else {
      p = p - k.lr * (g / avg);
    }
  }
  if (k.l1) {
    // Proximal step of lr*l1*|p|: soft-threshold, so small weights land on exactly 0.
    p = p - vmax(vmin(p, k.l1_thresh), k.neg_l1_thresh);
  }
}

// Gradient-dropout keep test shared by both backends: element kept iff its uniform >= p.
FTK_HD double drop_multiplier(float u, const OptimHyper& h, const StepConsts& c) {
  return u >= static_cast<float>(h.grad_dropout) ? c.keep_scale : 0.0;
}

FTK_HD bool mask_bit(const uint8_t* bits, int64_t i) { return (bits[i >> 3] >> (i & 7)) & 1; }

// Compact state: the param element that state element i updates (int32 or int64 index).
FTK_HD int64_t compact_index(const void* index, bool index64, int64_t i) {
  return index64 ? static_cast<const int64_t*>(index)[i] : static_cast<const int32_t*>(index)[i];
}

}  // namespace ftk
