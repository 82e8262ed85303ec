// CPU kernel of the fused LoReFT intervention h' = D(h + R^T (W h + b - R h)). Rank-r GEMMs go to
// ATen's BLAS. Without dropout and in fp32/fp64 the whole matrices go to BLAS (two calls forward);
// otherwise rows are processed in cache-sized blocks so the fp32 copy of a bf16 block and the
// dropout multipliers never exist whole, and backward regenerates the mask from the seed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "ftk/lora.h"
#include "ftk/lora_cpu.h"
#include "ftk/loreft_host.h"

namespace ftk {
namespace {

void check_reft(const at::Tensor& h, const at::Tensor& rot, const at::Tensor& w, double dropout) {
  FTK_CHECK(h.dim() == 2 && rot.dim() == 2 && w.dim() == 2, "ftkernels loreft: h, R and W must be 2-D");
  FTK_CHECK(rot.sizes() == w.sizes() && rot.size(1) == h.size(1), "ftkernels loreft: R ", rot.sizes(), " and W ",
            w.sizes(), " must both be [r, d] with d = ", h.size(1));
  FTK_CHECK(h.is_floating_point() && rot.scalar_type() == w.scalar_type() && rot.is_floating_point(),
            "ftkernels loreft: h must be floating and R, W share one floating dtype (converted to the "
            "accumulation dtype inside)");
  FTK_CHECK(dropout >= 0 && dropout < 1, "ftkernels loreft: dropout must be in [0, 1), got ", dropout);
}

// Row-block loop: body(m0, rows, mult) with mult the [rows, d] keep multipliers (null without
// dropout), blocks spread over threads; each thread keeps its own buffers.
template <typename Acc, typename Body>
void for_row_blocks(int64_t M, int64_t d, int64_t rb, double dropout, int64_t seed, const Body& body) {
  const int64_t nblocks = (M + rb - 1) / rb;
  const uint32_t thr = dropout_threshold(dropout);
  const Acc inv_keep = static_cast<Acc>(1.0 / (1.0 - dropout));
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    const at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads start with it on
    std::vector<Acc> mult(dropout > 0 ? rb * d : 0);
    std::vector<uint16_t> draws(8 * ((d + 7) / 8));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * rb, rows = std::min(rb, M - m0);
      if (dropout > 0)
        for (int64_t i = 0; i < rows; ++i)
          keep_multipliers(static_cast<uint64_t>(seed), m0 + i, d, thr, inv_keep, mult.data() + i * d, draws.data());
      body(m0, rows, dropout > 0 ? mult.data() : nullptr);
    }
  });
}

// dst (a [rows, d] block of any floating dtype, rows contiguous) = src * mult, or src cast.
template <typename T, typename Acc>
void store_block(T* dst, int64_t ld, const Acc* src, const Acc* mult, int64_t rows, int64_t d) {
  for (int64_t i = 0; i < rows; ++i) {
    T* o = dst + i * ld;
    const Acc* sr = src + i * d;
    if (mult) {
      const Acc* mr = mult + i * d;
      for (int64_t k = 0; k < d; ++k) o[k] = static_cast<T>(sr[k] * mr[k]);
    } else {
      for (int64_t k = 0; k < d; ++k) o[k] = static_cast<T>(sr[k]);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> loreft_fwd_cpu(const at::Tensor& h_in, const at::Tensor& rot, const at::Tensor& w,
                                                  const at::Tensor& b, double dropout, int64_t seed) {
  check_reft(h_in, rot, w, dropout);
  FTK_CHECK(b.dim() == 1 && b.size(0) == rot.size(0), "ftkernels loreft: b must be [r]");
  const at::Tensor h = h_in.contiguous();
  const int64_t M = h.size(0), d = h.size(1), R = rot.size(0);
  at::Tensor out = at::empty_like(h), s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "loreft_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool same = std::is_same_v<scalar_t, acc_t>;
    const auto acc = h.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor ra = rot.to(acc.dtype()), wmr = w.to(acc.dtype()) - ra, ba = b.to(acc.dtype());
    s = at::empty({M, R}, acc);
    if (M == 0) return;
    if (same && dropout == 0) {  // two BLAS calls over the whole matrices
      at::addmm_out(s, ba, h, wmr.t());
      at::addmm_out(out, h, s, ra);
      return;
    }
    const int64_t rb = rows_per_block(d);
    scalar_t* op = out.data_ptr<scalar_t>();
    for_row_blocks<acc_t>(M, d, rb, dropout, seed, [&](int64_t m0, int64_t rows, const acc_t* mult) {
      const at::Tensor hb = h.narrow(0, m0, rows).to(acc.dtype());
      at::Tensor sb = s.narrow(0, m0, rows);
      at::addmm_out(sb, ba, hb, wmr.t());
      const at::Tensor ob = at::addmm(hb, sb, ra);  // [rows, d] in acc
      store_block(op + m0 * d, d, ob.data_ptr<acc_t>(), mult, rows, d);
    });
  });
  return {out, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> loreft_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& h_in,
                                                                          const at::Tensor& rot, const at::Tensor& w,
                                                                          const at::Tensor& s, double dropout,
                                                                          int64_t seed) {
  check_reft(h_in, rot, w, dropout);
  FTK_CHECK(grad_in.sizes() == h_in.sizes() && grad_in.scalar_type() == h_in.scalar_type(),
            "ftkernels loreft: grad ", grad_in.sizes(), " does not match h ", h_in.sizes());
  FTK_CHECK(s.dim() == 2 && s.size(0) == h_in.size(0) && s.size(1) == rot.size(0), "ftkernels loreft: s must be [M, r]");
  const at::Tensor h = h_in.contiguous(), g = grad_in.contiguous();
  const int64_t M = h.size(0), d = h.size(1), R = rot.size(0);
  at::Tensor grad_h = at::empty_like(h), grad_r, grad_w, grad_b;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "loreft_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool same = std::is_same_v<scalar_t, acc_t>;
    const auto acc = h.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor ra = rot.to(acc.dtype()), wmr = w.to(acc.dtype()) - ra, sa = s.to(acc.dtype());
    if (same && dropout == 0) {  // whole-matrix BLAS: t = g R^T, grad_h = g + t (W - R)
      const at::Tensor t = at::mm(g, ra.t());
      at::addmm_out(grad_h, g, t, wmr);
      grad_w = at::mm(t.t(), h);
      grad_r = at::mm(sa.t(), g).sub_(grad_w);
      grad_b = t.sum(0);
    } else {
      // Per-thread partials of t^T h, s^T D(g) and sum(t), summed once after the blocks.
      const int nthreads = at::get_num_threads();
      const at::Tensor part_w = at::zeros({nthreads, R, d}, acc), part_s = at::zeros({nthreads, R, d}, acc);
      const at::Tensor part_b = at::zeros({nthreads, R}, acc);
      scalar_t* gp = grad_h.data_ptr<scalar_t>();
      for_row_blocks<acc_t>(M, d, rows_per_block(d), dropout, seed, [&](int64_t m0, int64_t rows, const acc_t* mult) {
        const int slot = at::get_thread_num();
        at::Tensor gd = g.narrow(0, m0, rows).to(acc.dtype(), /*non_blocking=*/false, /*copy=*/mult != nullptr);
        if (mult) {  // gd = D(g): the forward's mask, regenerated
          acc_t* gdp = gd.data_ptr<acc_t>();
          for (int64_t i = 0; i < rows * d; ++i) gdp[i] *= mult[i];
        }
        const at::Tensor hb = h.narrow(0, m0, rows).to(acc.dtype());
        const at::Tensor t = at::mm(gd, ra.t());  // [rows, r]
        const at::Tensor ghb = at::addmm(gd, t, wmr);
        store_block(gp + m0 * d, d, ghb.data_ptr<acc_t>(), static_cast<const acc_t*>(nullptr), rows, d);
        part_w[slot].addmm_(t.t(), hb);
        part_s[slot].addmm_(sa.narrow(0, m0, rows).t(), gd);
        part_b[slot].add_(t.sum(0));
      });
      grad_w = part_w.sum(0);
      grad_r = part_s.sum(0).sub_(grad_w);
      grad_b = part_b.sum(0);
    }
  });
  return {grad_h, grad_r.to(rot.scalar_type()), grad_w.to(rot.scalar_type()), grad_b.to(rot.scalar_type())};
}

}  // namespace ftk
