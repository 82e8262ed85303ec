// CPU kernel of the fused LoRA Linear. The base GEMM and the skinny rank-r GEMMs go to ATen's BLAS.
// With dropout, rows are handled in blocks small enough that the dropped block (built from the
// Philox stream of ftk/lora.h in a thread-local buffer) stays in cache: the dropped copy of x is
// never materialized whole nor saved, and backward regenerates the same mask from the seed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "ftk/lora.h"
#include "ftk/lora_cpu.h"
#include "ftk/lora_host.h"

namespace ftk {
namespace {

void check_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                double dropout) {
  FTK_CHECK(x.dim() == 2 && weight.dim() == 2 && lora_a.dim() == 2 && lora_b.dim() == 2,
            "ftkernels lora_linear: x, weight, lora_a, lora_b must be 2-D");
  FTK_CHECK(weight.size(1) == x.size(1) && lora_a.size(1) == x.size(1) && lora_b.size(0) == weight.size(0) &&
                lora_b.size(1) == lora_a.size(0),
            "ftkernels lora_linear: shapes do not chain: x ", x.sizes(), ", weight ", weight.sizes(), ", lora_a ",
            lora_a.sizes(), ", lora_b ", lora_b.sizes());
  FTK_CHECK(x.scalar_type() == weight.scalar_type() && x.scalar_type() == lora_a.scalar_type() &&
                x.scalar_type() == lora_b.scalar_type(),
            "ftkernels lora_linear: x, weight, lora_a, lora_b must share one dtype");
  FTK_CHECK(dropout >= 0 && dropout < 1, "ftkernels lora_linear: dropout must be in [0, 1), got ", dropout);
}

// Row block [m0, m0 + rows) of the dropout: mult[i, k] = 1/(1-p) where the stream keeps element
// (m0 + i, k), else 0, and buf = x * mult (the dropped, scaled rows). Branch-free, so both loops
// vectorize.
template <typename T, typename Acc>
void dropped_block(const T* x, int64_t ldx, int64_t m0, int64_t rows, int64_t K, uint64_t seed, uint32_t thr,
                   Acc inv_keep, Acc* buf, Acc* mult, uint16_t* draws) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* xr = x + (m0 + i) * ldx;
    Acc* br = buf + i * K;
    Acc* mr = mult + i * K;
    keep_multipliers(seed, m0 + i, K, thr, inv_keep, mr, draws);
    for (int64_t k = 0; k < K; ++k) br[k] = static_cast<Acc>(xr[k]) * mr[k];
  }
}

struct Workspace {
  at::Tensor buf, mult;  // [rows, K] dropped block and keep multipliers, accumulation dtype
  std::vector<uint16_t> draws;
  Workspace(int64_t rb, int64_t K, const at::TensorOptions& acc)
      : buf(at::empty({rb, K}, acc)), mult(at::empty({rb, K}, acc)), draws(8 * ((K + 7) / 8)) {}
};

}  // namespace

// The base GEMM runs whole in multi-threaded BLAS (on CPU it is compute-bound, and per-block GEMMs
// lose ~5-10% to it); the rank-r part is cheap except for dropout, which runs over row blocks.
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                       const at::Tensor& lora_b, double scaling, double dropout,
                                                       int64_t seed) {
  check_args(x, weight, lora_a, lora_b, dropout);
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor y = has_bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  const int64_t M = x.size(0), K = x.size(1), R = lora_a.size(0);
  at::Tensor u;
  if (dropout == 0) {
    u = at::mm(x, lora_a.t());
  } else {
    u = at::empty({M, R}, x.options());
    const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
    const uint32_t thr = dropout_threshold(dropout);
    const double inv_keep = 1.0 / (1.0 - dropout);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_linear_fwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto acc = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
      const at::Tensor a_t = lora_a.to(acc.dtype()).t().contiguous();  // [K, R]
      const int64_t rb = rows_per_block(K), nblocks = (M + rb - 1) / rb;
      const scalar_t* xp = xc.data_ptr<scalar_t>();
      at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
        const at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads start with it on
        Workspace ws(rb, K, acc);
        at::Tensor ub_full = at::empty({rb, R}, acc);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t m0 = b * rb, rows = std::min(rb, M - m0);
          at::Tensor ub = ub_full.narrow(0, 0, rows);
          dropped_block(xp, xc.stride(0), m0, rows, K, static_cast<uint64_t>(seed), thr, static_cast<acc_t>(inv_keep),
                        ws.buf.data_ptr<acc_t>(), ws.mult.data_ptr<acc_t>(), ws.draws.data());
          at::mm_out(ub, ws.buf.narrow(0, 0, rows), a_t);
          u.narrow(0, m0, rows).copy_(ub);
        }
      });
    });
  }
  y.addmm_(u, lora_b.t(), 1.0, scaling);
  return {y, u};
}

// grad_x = g W runs whole in BLAS; everything rank-r runs in one parallel pass over row blocks of
// g and x: v = s g B, the grad_B and grad_A partials (per thread, summed once: deterministic for a
// given thread count) and grad_x += D'(v A). Skinny BLAS calls on whole matrices parallelize
// poorly; per-block ones on both threads measured ~2x faster. A thread's first block writes its
// partials with beta = 0 (no zero fill) and one partial is used as is (no sum): small layers are
// bound by the number of ATen calls, not by flops.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& lora_a,
                                                                   const at::Tensor& lora_b, const at::Tensor& u,
                                                                   double scaling, double dropout, int64_t seed,
                                                                   bool need_x,
                                                                   const c10::optional<at::Tensor>& grad_x_acc) {
  check_args(x, weight, lora_a, lora_b, dropout);
  FTK_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == weight.size(0) &&
                grad.scalar_type() == x.scalar_type(),
            "ftkernels lora_linear: grad ", grad.sizes(), " does not match the output of x ", x.sizes(), " and weight ",
            weight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_a.size(0);
  const bool acc_x = need_x && grad_x_acc.has_value() && grad_x_acc->defined();
  if (acc_x)
    FTK_CHECK(grad_x_acc->sizes() == x.sizes() && grad_x_acc->scalar_type() == x.scalar_type() &&
                  grad_x_acc->is_contiguous(),
              "ftkernels lora_linear: grad_x_acc must be a contiguous ", x.scalar_type(), " tensor of shape ",
              x.sizes());
  // A group of layers sharing x accumulates its grad_x in one buffer (no per-layer buffer and sum).
  at::Tensor grad_x = !need_x ? at::empty({0}, x.options())
                      : acc_x ? grad_x_acc->addmm_(grad, weight)
                              : at::mm(grad, weight);
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const uint32_t thr = dropout_threshold(dropout);
  const double inv_keep = 1.0 / (1.0 - dropout);
  at::Tensor grad_a, grad_b;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_linear_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool same = std::is_same_v<scalar_t, acc_t>;
    const auto acc = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::ScalarType acc_type = acc.dtype().toScalarType();
    const at::Tensor af = same ? lora_a : lora_a.to(acc_type), bf = same ? lora_b : lora_b.to(acc_type);
    // Without dropout and without dtype conversion no block buffer exists, so one block per thread
    // (fewest ATen calls); otherwise blocks are sized for the cache.
    const int64_t nthr = at::get_num_threads();
    const int64_t rb = dropout == 0 && same ? std::max<int64_t>((M + nthr - 1) / nthr, 1) : rows_per_block(K);
    const int64_t nblocks = std::max<int64_t>((M + rb - 1) / rb, 1);
    // One slot per thread that may run (parallel_for numbers its threads from 0).
    const int nslots = nblocks == 1 ? 1 : static_cast<int>(nthr);
    const at::Tensor part_a = at::empty({nslots, R, K}, acc), part_b = at::empty({nslots, N, R}, acc);
    std::vector<char> used(nslots, 0);
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const bool masked_epilogue = need_x && (dropout > 0 || !same);
    auto run = [&](int64_t b0, int64_t b1, int slot) {
      const at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads start with it on
      std::optional<Workspace> ws;
      if (dropout > 0) ws.emplace(rb, K, acc);
      at::Tensor mine_a = part_a[slot], mine_b = part_b[slot];
      at::Tensor t = masked_epilogue ? at::empty({rb, K}, acc) : at::Tensor();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = b * rb, rows = std::min(rb, M - m0);
        const double beta = b == b0 ? 0.0 : 1.0;  // beta 0 ignores the uninitialized partial
        const at::Tensor gb = same ? grad.narrow(0, m0, rows) : grad.narrow(0, m0, rows).to(acc_type);
        const at::Tensor ubk = same ? u.narrow(0, m0, rows) : u.narrow(0, m0, rows).to(acc_type);
        // v = s g B as one GEMM (alpha s, beta 0 ignores the uninitialized output): a mul_ less,
        // and its scalar-to-tensor cast, per block.
        at::Tensor vb = at::empty({rows, R}, gb.options());  // [rows, R]
        at::addmm_out(vb, vb, gb, bf, 0.0, scaling);
        mine_b.addmm_(gb.t(), ubk, beta, scaling);
        at::Tensor dx;  // D(x) block
        if (dropout > 0) {
          dropped_block(xp, xc.stride(0), m0, rows, K, static_cast<uint64_t>(seed), thr,
                        static_cast<acc_t>(inv_keep), ws->buf.data_ptr<acc_t>(), ws->mult.data_ptr<acc_t>(),
                        ws->draws.data());
          dx = ws->buf.narrow(0, 0, rows);
        } else {
          dx = same ? xc.narrow(0, m0, rows) : xc.narrow(0, m0, rows).to(acc_type);
        }
        mine_a.addmm_(vb.t(), dx, beta, 1.0);
        if (!need_x) continue;
        at::Tensor gxb = grad_x.narrow(0, m0, rows);
        if (!masked_epilogue) {
          gxb.addmm_(vb, af);
          continue;
        }
        at::Tensor tb = t.narrow(0, 0, rows);
        at::mm_out(tb, vb, af);  // [rows, K] = v A, masked below: D'(v A)
        const acc_t* tp = tb.data_ptr<acc_t>();
        const acc_t* mp = dropout > 0 ? ws->mult.data_ptr<acc_t>() : nullptr;
        for (int64_t i = 0; i < rows; ++i) {
          scalar_t* gr = gxb.data_ptr<scalar_t>() + i * K;
          if (dropout > 0) {
            for (int64_t k = 0; k < K; ++k)
              gr[k] = static_cast<scalar_t>(static_cast<acc_t>(gr[k]) + tp[i * K + k] * mp[i * K + k]);
          } else {
            for (int64_t k = 0; k < K; ++k) gr[k] = static_cast<scalar_t>(static_cast<acc_t>(gr[k]) + tp[i * K + k]);
          }
        }
      }
    };
    if (nslots == 1) {
      run(0, nblocks, 0);  // no parallel region: one slot, the caller's thread
      used[0] = 1;
    } else {
      at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
        const int slot = at::get_thread_num();
        FTK_CHECK(slot < nslots, "ftkernels lora_linear: thread ", slot, " beyond ", nslots, " slots");
        run(b0, b1, slot);
        used[slot] = 1;
      });
    }
    std::vector<int64_t> slots;
    for (int64_t i = 0; i < nslots; ++i)
      if (used[i]) slots.push_back(i);
    auto reduce = [&](const at::Tensor& part) {
      if (slots.size() == 1) return part[slots[0]];
      return part.index_select(0, at::tensor(slots, at::kLong)).sum(0);
    };
    grad_a = reduce(part_a).to(x.scalar_type());
    grad_b = reduce(part_b).to(x.scalar_type());  // [N, R], scaled in its addmm
  });
  if (M == 0) {  // no rows: no block ran; the grads are zero
    grad_a = at::zeros_like(lora_a);
    grad_b = at::zeros_like(lora_b);
  }
  return {grad_x, grad_a, grad_b};
}

}  // namespace ftk
