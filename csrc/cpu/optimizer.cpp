// CPU kernel of the fused optimizer step: all params of a group in one at::parallel_for over
// fixed-size work items; fp32/fp64 params run the shared rule on at::vec::Vectorized, other
// dtypes (bf16/fp16, master weights) on scalars. Rule: ftk/optimizer.h.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ftk/optimizer_host.h"
#include "ftk/philox.h"

namespace ftk {
namespace {

// Read-only side input (anchor, Fisher) of any floating dtype, converted on load.
struct Aux {
  const void* ptr = nullptr;
  at::ScalarType type = at::kFloat;

  template <class W>
  W load(int64_t i) const {
    switch (type) {
      case at::kDouble: return static_cast<W>(static_cast<const double*>(ptr)[i]);
      case at::kBFloat16: return static_cast<W>(static_cast<float>(static_cast<const at::BFloat16*>(ptr)[i]));
      case at::kHalf: return static_cast<W>(static_cast<float>(static_cast<const at::Half*>(ptr)[i]));
      default: return static_cast<W>(static_cast<const float*>(ptr)[i]);
    }
  }
};

// One parameter's tensors, untyped; the work function chosen for it knows the types.
struct Job {
  void* p = nullptr;
  const void* g = nullptr;
  void *s1 = nullptr, *s2 = nullptr, *s3 = nullptr;
  float* master = nullptr;
  const uint8_t* mask = nullptr;
  Aux anchor, fisher;
  const void* index = nullptr;  // compact state: element i of the state is param element index[i]
  bool index64 = false;
  int64_t numel = 0;  // state elements (the index's length when compact)
  uint32_t tensor_id = 0;
  StepConsts c;
  void (*run)(const OptimHyper&, uint64_t, const Job&, int64_t, int64_t) = nullptr;  // Runner
};

template <class P>
using work_t = std::conditional_t<std::is_same_v<P, double>, double, float>;

// Any dtypes: P param/grad, S state; works in W (fp32, or fp64 for fp64 params).
template <int KIND, class P, class S>
void scalar_range(const OptimHyper& h, uint64_t seed, const Job& j, int64_t b, int64_t e) {
  using W = work_t<P>;
  P* p = static_cast<P*>(j.p);
  const P* g = static_cast<const P*>(j.g);
  S* s1 = static_cast<S*>(j.s1);
  S* s2 = static_cast<S*>(j.s2);
  S* s3 = static_cast<S*>(j.s3);
  const bool reg = h.l2sp != 0 || h.ewc != 0;
  const RuleConsts<W> k = rule_consts<W>(h, j.c);
  U32x4 r{};
  for (int64_t i = b; i < e; ++i) {
    if (h.grad_dropout > 0 && (i == b || (i & 7) == 0)) r = philox_dropout_words(seed, j.tensor_id, i >> 3);
    if (j.mask && !mask_bit(j.mask, i)) continue;
    // q: the param element of state element i (the same unless the state is compact)
    const int64_t q = j.index ? compact_index(j.index, j.index64, i) : i;
    W pv = j.master ? static_cast<W>(j.master[i]) : static_cast<W>(p[q]);
    W a = s1 ? static_cast<W>(s1[i]) : W(0);
    W bb = s2 ? static_cast<W>(s2[i]) : W(0);
    W cc = s3 ? static_cast<W>(s3[i]) : W(0);
    W an = reg ? j.anchor.load<W>(q) : W(0);
    W fi = h.ewc != 0 ? j.fisher.load<W>(q) : W(0);
    W drop = h.grad_dropout > 0 ? static_cast<W>(drop_multiplier(dropout_uniform(r, static_cast<int>(i & 7)), h, j.c)) : W(1);
    optim_update<KIND, W>(k, pv, static_cast<W>(g[q]), a, bb, cc, an, fi, drop);
    if (j.master) j.master[i] = static_cast<float>(pv);
    p[q] = static_cast<P>(pv);
    if (s1) s1[i] = static_cast<S>(a);
    if (s2) s2[i] = static_cast<S>(bb);
    if (s3) s3[i] = static_cast<S>(cc);
  }
}

// Bits [i, i+n) of a packed mask, n <= 32.
inline uint64_t mask_bits(const uint8_t* m, int64_t i, int n) {
  uint64_t word = 0;
  const int64_t first = i >> 3, last = (i + n - 1) >> 3;
  for (int64_t k = last; k >= first; --k) word = (word << 8) | m[k];
  return (word >> (i & 7)) & ((uint64_t(1) << n) - 1);
}

// Side input as a SIMD vector: a straight load when stored in W, else converted per lane.
template <class W, class V>
inline V load_aux_vec(const Aux& x, bool native, int64_t i, W* buf) {
  if (native) return V::loadu(static_cast<const W*>(x.ptr) + i);
  for (int k = 0; k < V::size(); ++k) buf[k] = x.load<W>(i + k);
  return V::loadu(buf);
}

// Lane mask (all bits set where the mask bit is 1) for blendv.
template <class W, class V>
inline V lane_mask(uint64_t bits) {
  using I = std::conditional_t<sizeof(W) == 8, int64_t, int32_t>;
  alignas(64) I lanes[V::size()];
  for (int k = 0; k < V::size(); ++k) lanes[k] = -static_cast<I>((bits >> k) & 1);
  return V::loadu(lanes);
}

// W-precision SIMD vector <-> V::size() stored elements of T. T == W: plain loads and stores;
// bf16/fp16 widen to fp32 exactly and round back to nearest-even (bf16 NaN -> 0x7FC0) as c10's
// scalar conversions do, so this loop stores the bits the scalar loop would.
template <class V, class T>
inline V vload(const T* ptr) {
  using W = typename V::value_type;
  if constexpr (std::is_same_v<T, W>) {
    return V::loadu(ptr);
  } else {
#if defined(CPU_CAPABILITY_AVX2)
    static_assert(V::size() == 8, "AVX2 fp32 vectors hold 8 lanes");
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ptr));
    if constexpr (std::is_same_v<T, at::BFloat16>) return V(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    else return V(_mm256_cvtph_ps(h));
#else
    alignas(64) W buf[V::size()];
    for (int k = 0; k < V::size(); ++k) buf[k] = static_cast<W>(ptr[k]);
    return V::loadu(buf);
#endif
  }
}

template <class V, class T>
inline void vstore(T* ptr, const V& v) {
  using W = typename V::value_type;
  if constexpr (std::is_same_v<T, W>) {
    v.store(ptr);
  } else {
#if defined(CPU_CAPABILITY_AVX2)
    __m128i h;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      const __m256 f = v;
      const __m256i u = _mm256_castps_si256(f);
      const __m256i bias =
          _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7FFF));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
      h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    } else {
      h = _mm256_cvtps_ph(static_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(ptr), h);
#else
    alignas(64) W buf[V::size()];
    v.store(buf);
    for (int k = 0; k < V::size(); ++k) ptr[k] = static_cast<T>(buf[k]);
#endif
  }
}

// Dense (not compact) state, params P of any float dtype with state S of P's dtype or fp32 (and an
// fp32 master copy for bf16/fp16 when asked): SIMD body in W (mixed-mask vectors are blended back
// to their old values), scalar tail. Dropout uniforms come in blocks from a Philox loop the
// compiler vectorizes. SIDE = false compiles out the mask, dropout and anchor paths (a plain
// step): their loop-invariant tests made the plain loop ~20% slower on Zen 2.
template <int KIND, class P, class S, bool SIDE>
void vector_range(const OptimHyper& h_in, uint64_t seed, const Job& j, int64_t b, int64_t e) {
  using W = work_t<P>;
  using V = at::vec::Vectorized<W>;
  static_assert(std::is_same_v<S, P> || std::is_same_v<S, W>, "state in the param's dtype or the working one");
  // Local copies: the compiler can then hoist every constant out of the loop (stores through
  // p/s1/s2 pointers cannot alias them).
  const OptimHyper h = h_in;
  const StepConsts c = j.c;
  const RuleConsts<V> k = rule_consts<V>(h, c);
  constexpr int L = V::size();
  constexpr int64_t kBlock = 256;  // dropout multipliers generated per block; a multiple of L and 8
  static_assert(kBlock % L == 0 && kBlock % 8 == 0, "block must hold whole vectors and Philox groups");
  TORCH_INTERNAL_ASSERT(b % 8 == 0, "work items start on Philox group boundaries");
  P* p = static_cast<P*>(j.p);
  const P* g = static_cast<const P*>(j.g);
  S* s1 = static_cast<S*>(j.s1);
  S* s2 = static_cast<S*>(j.s2);
  S* s3 = static_cast<S*>(j.s3);
  // fp32 copy of a bf16/fp16 param; fp32/fp64 params never have one (a compile-time null: no test)
  float* master = std::is_same_v<P, W> ? nullptr : j.master;
  const uint8_t* mask = SIDE ? j.mask : nullptr;
  const bool reg = SIDE && (h.l2sp != 0 || h.ewc != 0);
  const bool ewc = SIDE && h.ewc != 0;
  const bool dropout = SIDE && h.grad_dropout > 0;
  const bool anchor_native = j.anchor.type == c10::CppTypeToScalarType<W>::value;
  const bool fisher_native = j.fisher.type == c10::CppTypeToScalarType<W>::value;
  const W keep_scale = static_cast<W>(c.keep_scale);
  const uint32_t drop_threshold = dropout_threshold(h.grad_dropout);
  alignas(64) W abuf[L], fbuf[L];
  alignas(64) uint16_t ublock[kBlock];
  alignas(64) W dblock[kBlock];
  const V zero(W(0)), one(W(1));
  const int64_t e_vec = b + (e - b) / L * L;
  for (int64_t i0 = b; i0 < e_vec; i0 += kBlock) {
    const int64_t i1 = std::min(i0 + kBlock, e_vec);
    if (dropout) {
      philox_dropout_block(seed, j.tensor_id, static_cast<uint64_t>(i0) >> 3, static_cast<int>((i1 - i0 + 7) / 8),
                           ublock);
      for (int64_t q = 0; q < i1 - i0; ++q) dblock[q] = ublock[q] >= drop_threshold ? keep_scale : W(0);
    }
    for (int64_t i = i0; i < i1; i += L) {
      uint64_t bits = (uint64_t(1) << L) - 1;
      if (mask) {
        bits = mask_bits(mask, i, L);
        if (bits == 0) continue;  // all frozen: nothing read, nothing written
      }
      const V drop = dropout ? V::loadu(dblock + (i - i0)) : one;
      const V an = reg ? load_aux_vec<W, V>(j.anchor, anchor_native, i, abuf) : zero;
      const V fi = ewc ? load_aux_vec<W, V>(j.fisher, fisher_native, i, fbuf) : zero;
      V p0;
      if constexpr (std::is_same_v<W, float>) p0 = master ? V::loadu(master + i) : vload<V>(p + i);
      else p0 = vload<V>(p + i);
      const V a0 = s1 ? vload<V>(s1 + i) : zero;
      const V b0 = s2 ? vload<V>(s2 + i) : zero;
      const V c0 = s3 ? vload<V>(s3 + i) : zero;
      V pv = p0, a = a0, bb = b0, cc = c0;
      optim_update<KIND, V>(k, pv, vload<V>(g + i), a, bb, cc, an, fi, drop);
      V pout = pv;  // what p stores
      if (bits != (uint64_t(1) << L) - 1) {  // mixed: frozen lanes keep their exact old values
        const V m = lane_mask<W, V>(bits);
        pv = V::blendv(p0, pv, m);
        // With a master copy, p's frozen lanes keep p's own old bits (not the master's rounding).
        pout = master ? V::blendv(vload<V>(p + i), pv, m) : pv;
        a = V::blendv(a0, a, m);
        bb = V::blendv(b0, bb, m);
        cc = V::blendv(c0, cc, m);
      }
      if constexpr (std::is_same_v<W, float>) {
        if (master) pv.store(master + i);
      }
      vstore(p + i, pout);
      if (s1) vstore(s1 + i, a);
      if (s2) vstore(s2 + i, bb);
      if (s3) vstore(s3 + i, cc);
    }
  }
  if (e_vec < e) scalar_range<KIND, P, S>(h, seed, j, e_vec, e);
}

using Runner = void (*)(const OptimHyper&, uint64_t, const Job&, int64_t, int64_t);

template <int KIND, class P, class S>
Runner simd_runner(bool side) {
  return side ? &vector_range<KIND, P, S, true> : &vector_range<KIND, P, S, false>;
}

// Dense state takes the SIMD loop; compact state (gathered elements) the scalar one.
template <int KIND>
Runner pick_runner(at::ScalarType p, at::ScalarType s, bool master, bool indexed, bool side) {
  const bool same = p == s;
  if (!indexed && !(master && s != at::kFloat)) {
    switch (p) {
      case at::kFloat:
        if (same) return simd_runner<KIND, float, float>(side);
        break;
      case at::kDouble:
        if (same) return simd_runner<KIND, double, double>(side);
        break;
      case at::kBFloat16:
        return same ? simd_runner<KIND, at::BFloat16, at::BFloat16>(side) : simd_runner<KIND, at::BFloat16, float>(side);
      case at::kHalf: return same ? simd_runner<KIND, at::Half, at::Half>(side) : simd_runner<KIND, at::Half, float>(side);
      default: break;
    }
  }
  if (same && p == at::kDouble) return &scalar_range<KIND, double, double>;
  switch (p) {
    case at::kFloat: return &scalar_range<KIND, float, float>;
    case at::kBFloat16:
      return same ? &scalar_range<KIND, at::BFloat16, at::BFloat16> : &scalar_range<KIND, at::BFloat16, float>;
    case at::kHalf: return same ? &scalar_range<KIND, at::Half, at::Half> : &scalar_range<KIND, at::Half, float>;
    default: FTK_CHECK(false, "ftkernels: unsupported param dtype ", p);
  }
}

float scalar_or(const OptTensor& t, float fallback) {
  return (t.has_value() && t->defined()) ? t->item<float>() : fallback;
}

}  // namespace

void fused_optim_step_cpu(const OptimArgs& a) {
  const OptimHyper& h = a.hyper;
  if (scalar_or(a.skip, 0.0f) != 0.0f) return;  // AMP found inf/NaN, or non-finite grad norm
  const double lr = a.lr.has_value() && a.lr->defined() ? a.lr->item<double>() : h.lr;
  const double inv_scale = 1.0 / scalar_or(a.grad_scale, 1.0f);
  const double norm = scalar_or(a.total_norm, -1.0f);

  std::vector<Job> jobs(a.params.size());
  for (size_t i = 0; i < a.params.size(); ++i) {
    Job& j = jobs[i];
    const at::Tensor& p = a.params[i];
    FTK_CHECK(p.device().is_cpu(), "ftkernels: CPU optimizer step got a tensor on ", p.device());
    j.p = p.data_ptr();
    j.g = a.grads[i].data_ptr();
    at::ScalarType state_type = p.scalar_type();
    if (const at::Tensor* t = get(a.s1, i)) j.s1 = t->data_ptr(), state_type = t->scalar_type();
    if (const at::Tensor* t = get(a.s2, i)) j.s2 = t->data_ptr();
    if (const at::Tensor* t = get(a.s3, i)) j.s3 = t->data_ptr();
    for (const OptTensorList* l : {&a.s2, &a.s3})
      if (const at::Tensor* t = get(*l, i))
        FTK_CHECK(t->scalar_type() == state_type, "ftkernels: optimizer states of one param differ in dtype");
    FTK_CHECK(state_type == p.scalar_type() || state_type == at::kFloat,
              "ftkernels: optimizer state must be float32 or the param's dtype");
    if (const at::Tensor* t = get(a.masters, i)) j.master = t->data_ptr<float>();
    if (const at::Tensor* t = get(a.masks, i)) j.mask = t->data_ptr<uint8_t>();
    if (const at::Tensor* t = get(a.anchors, i)) j.anchor = Aux{t->data_ptr(), t->scalar_type()};
    if (const at::Tensor* t = get(a.fishers, i)) j.fisher = Aux{t->data_ptr(), t->scalar_type()};
    j.numel = p.numel();
    if (const at::Tensor* t = get(a.indices, i)) {
      j.index = t->data_ptr(), j.index64 = t->scalar_type() == at::kLong, j.numel = t->numel();
    }
    FTK_CHECK(!(h.l2sp != 0 || h.ewc != 0) || j.anchor.ptr, "ftkernels: L2-SP/EWC needs an anchor for param ", i);
    FTK_CHECK(h.ewc == 0 || j.fisher.ptr, "ftkernels: EWC needs a Fisher diagonal for param ", i);
    j.tensor_id = static_cast<uint32_t>(a.tensor_ids[i]);
    FTK_CHECK(a.steps[i].device().is_cpu(), "ftkernels: step of param ", i, " must be on the CPU");
    float* step = a.steps[i].data_ptr<float>();
    *step += 1.0f;  // the op owns the step count: advanced unless the step is skipped
    j.c = make_step_consts(h, lr, *step, inv_scale, norm);
    const bool master = j.master != nullptr, indexed = j.index != nullptr;
    const bool side = j.mask || h.grad_dropout > 0 || h.l2sp != 0 || h.ewc != 0;  // else the plain loop
    switch (h.kind) {
      case kAdamW: j.run = pick_runner<kAdamW>(p.scalar_type(), state_type, master, indexed, side); break;
      case kSGD: j.run = pick_runner<kSGD>(p.scalar_type(), state_type, master, indexed, side); break;
      case kAdagrad: j.run = pick_runner<kAdagrad>(p.scalar_type(), state_type, master, indexed, side); break;
      default: j.run = pick_runner<kRMSprop>(p.scalar_type(), state_type, master, indexed, side); break;
    }
  }

  // Work items of up to 32K elements across all tensors, so many small tensors share threads.
  constexpr int64_t kItem = 32768;
  std::vector<std::pair<int32_t, int64_t>> items;
  for (size_t i = 0; i < jobs.size(); ++i)
    for (int64_t s = 0; s < jobs[i].numel; s += kItem) items.emplace_back(static_cast<int32_t>(i), s);
  const uint64_t seed = static_cast<uint64_t>(a.seed);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const auto [t, s] = items[k];
      const Job& j = jobs[t];
      j.run(h, seed, j, s, std::min(s + kItem, j.numel));
    }
  });
}

}  // namespace ftk
