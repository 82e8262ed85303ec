// CUDA kernel of the fused optimizer step: multi-tensor apply. One launch per dtype combination
// covers every param of a group; each block takes one 64K-element chunk of one tensor; each
// thread moves 4 consecutive elements with 16-byte (fp32) vector accesses. Rule: ftk/optimizer.h.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ftk/optimizer_host.h"
#include "ftk/philox.h"

namespace ftk {
namespace {

constexpr int kThreads = 512;
constexpr int kIlp = 4;
constexpr int64_t kChunk = 65536;  // elements per block; a multiple of 8 so Philox groups align

enum AuxType : int32_t { kAuxF32 = 0, kAuxBF16 = 1, kAuxF16 = 2, kAuxF64 = 3 };

struct TensorMeta {
  void* p;
  const void* g;
  void *s1, *s2, *s3;
  float* master;
  const uint8_t* mask;
  const void* anchor;
  const void* fisher;
  const float* step;
  const void* index;  // compact state: state element i updates param element index[i]
  int64_t numel;      // state elements (the index's length when compact)
  uint32_t tensor_id;
  int32_t anchor_type, fisher_type;
  int32_t aligned;  // every pointer allows 4-element vector access
  int32_t index64;
};

struct BlockWork {
  int32_t tensor;
  int32_t chunk;
};

struct StepScalars {  // device-resident scalars; null when absent
  const float* lr;
  const float* grad_scale;
  const float* skip;
  const float* total_norm;
  const int64_t* seed;  // grad-dropout seed on the device (CUDA graphs); null: the launch argument
};

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <class T>
__device__ __forceinline__ void load4(const T* ptr, int64_t i, int64_t n, bool vec, T (&out)[kIlp]) {
  if (vec) {
    const Pack<T, kIlp> pk = *reinterpret_cast<const Pack<T, kIlp>*>(ptr + i);
#pragma unroll
    for (int k = 0; k < kIlp; ++k) out[k] = pk.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < kIlp; ++k) out[k] = i + k < n ? ptr[i + k] : T(0);
  }
}

template <class T>
__device__ __forceinline__ void store4(T* ptr, int64_t i, int64_t n, bool vec, const T (&in)[kIlp]) {
  if (vec) {
    Pack<T, kIlp> pk;
#pragma unroll
    for (int k = 0; k < kIlp; ++k) pk.v[k] = in[k];
    *reinterpret_cast<Pack<T, kIlp>*>(ptr + i) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < kIlp; ++k)
      if (i + k < n) ptr[i + k] = in[k];
  }
}

template <class W>
__device__ __forceinline__ W load_aux(const void* ptr, int32_t type, int64_t i) {
  switch (type) {
    case kAuxBF16: return static_cast<W>(static_cast<float>(static_cast<const c10::BFloat16*>(ptr)[i]));
    case kAuxF16: return static_cast<W>(static_cast<float>(static_cast<const c10::Half*>(ptr)[i]));
    case kAuxF64: return static_cast<W>(static_cast<const double*>(ptr)[i]);
    default: return static_cast<W>(static_cast<const float*>(ptr)[i]);
  }
}

// IDX: the tensors of this launch have compact state (their own instantiation, so the dense
// kernel's registers are not spent on the gather).
template <int KIND, class P, class S, bool IDX>
__global__ void __launch_bounds__(kThreads, 2) fused_step_kernel(const TensorMeta* __restrict__ metas,
                                                              const BlockWork* __restrict__ work, OptimHyper h,
                                                              StepScalars sc, uint64_t seed) {
  using W = std::conditional_t<std::is_same_v<P, double>, double, float>;
  if (sc.skip && *sc.skip != 0.0f) return;  // AMP inf/NaN: skip without a host sync
  const BlockWork bw = work[blockIdx.x];
  const TensorMeta& m = metas[bw.tensor];
  __shared__ StepConsts shared_c;
  __shared__ RuleConsts<W> shared_k;  // read from shared memory per element: no registers held
  if (threadIdx.x == 0) {
    const double lr = sc.lr ? static_cast<double>(*sc.lr) : h.lr;
    const double inv_scale = sc.grad_scale ? 1.0 / static_cast<double>(*sc.grad_scale) : 1.0;
    const double norm = sc.total_norm ? static_cast<double>(*sc.total_norm) : -1.0;
    // step_count_kernel advances the stored count after this kernel; here it is still t - 1.
    shared_c = make_step_consts(h, lr, static_cast<double>(*m.step) + 1.0, inv_scale, norm);
    shared_k = rule_consts<W>(h, shared_c);
  }
  __syncthreads();
  const StepConsts c = shared_c;
  const int64_t start = static_cast<int64_t>(bw.chunk) * kChunk;
  const int64_t end = min(start + kChunk, m.numel);
  const bool reg = h.l2sp != 0 || h.ewc != 0;
  P* p = static_cast<P*>(m.p);
  const P* g = static_cast<const P*>(m.g);
  S* s1 = static_cast<S*>(m.s1);
  S* s2 = static_cast<S*>(m.s2);
  S* s3 = static_cast<S*>(m.s3);

  for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * kIlp; i < end; i += kThreads * kIlp) {
    const bool vec = m.aligned && i + kIlp <= m.numel;
    uint32_t active = 0xF;
    if (m.mask) {
      active = (m.mask[i >> 3] >> (i & 7)) & 0xF;  // i % 4 == 0: the 4 bits sit in one byte
      if (active == 0) continue;                    // frozen: nothing read, nothing written
    }
    P pv[kIlp], gv[kIlp];
    S a[kIlp] = {}, b[kIlp] = {}, cc[kIlp] = {};
    float mv[kIlp] = {};
    int64_t q[kIlp];  // the param element of each state element
#pragma unroll
    for (int k = 0; k < kIlp; ++k) q[k] = i + k;
    if constexpr (IDX) {
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        if (i + k < m.numel) q[k] = compact_index(m.index, m.index64, i + k);
        pv[k] = i + k < m.numel ? p[q[k]] : P(0);
        gv[k] = i + k < m.numel ? g[q[k]] : P(0);
      }
    } else {
      load4(p, i, m.numel, vec, pv);
      load4(g, i, m.numel, vec, gv);
    }
    if (s1) load4(s1, i, m.numel, vec, a);
    if (s2) load4(s2, i, m.numel, vec, b);
    if (s3) load4(s3, i, m.numel, vec, cc);
    if (m.master) load4(m.master, i, m.numel, vec, mv);
    float u[kIlp] = {};
    if (h.grad_dropout > 0) {  // this thread's 4 elements are one half of a Philox group of 8
      const uint64_t key = sc.seed ? static_cast<uint64_t>(*sc.seed) : seed;
      const U32x4 r = philox_dropout_words(key, m.tensor_id, static_cast<uint64_t>(i) >> 3);
      const bool upper = (i >> 2) & 1;
      const uint32_t w0 = upper ? r.z : r.x, w1 = upper ? r.w : r.y;
      u[0] = uniform16(w0, false);
      u[1] = uniform16(w0, true);
      u[2] = uniform16(w1, false);
      u[3] = uniform16(w1, true);
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      if (!((active >> k) & 1) || i + k >= m.numel) continue;
      W x = m.master ? static_cast<W>(mv[k]) : static_cast<W>(pv[k]);
      W sa = static_cast<W>(a[k]), sb = static_cast<W>(b[k]), sd = static_cast<W>(cc[k]);
      const W an = reg ? load_aux<W>(m.anchor, m.anchor_type, q[k]) : W(0);
      const W fi = h.ewc != 0 ? load_aux<W>(m.fisher, m.fisher_type, q[k]) : W(0);
      const W drop = h.grad_dropout > 0 ? static_cast<W>(drop_multiplier(u[k], h, c)) : W(1);
      optim_update<KIND, W>(shared_k, x, static_cast<W>(gv[k]), sa, sb, sd, an, fi, drop);
      if (m.master) mv[k] = static_cast<float>(x);
      pv[k] = static_cast<P>(x);
      a[k] = static_cast<S>(sa);
      b[k] = static_cast<S>(sb);
      cc[k] = static_cast<S>(sd);
    }
    if constexpr (IDX) {
#pragma unroll
      for (int k = 0; k < kIlp; ++k)
        if (i + k < m.numel) p[q[k]] = pv[k];
    } else {
      store4(p, i, m.numel, vec, pv);
    }
    if (s1) store4(s1, i, m.numel, vec, a);
    if (s2) store4(s2, i, m.numel, vec, b);
    if (s3) store4(s3, i, m.numel, vec, cc);
    if (m.master) store4(m.master, i, m.numel, vec, mv);
  }
}

// After the step kernel (stream order): every tensor's step count += 1 unless the step was skipped.
__global__ void step_count_kernel(const TensorMeta* __restrict__ metas, int n, const float* skip) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < n && !(skip && *skip != 0.0f)) *const_cast<float*>(metas[t].step) += 1.0f;
}

int32_t aux_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return kAuxBF16;
    case at::kHalf: return kAuxF16;
    case at::kDouble: return kAuxF64;
    case at::kFloat: return kAuxF32;
    default: FTK_CHECK(false, "ftkernels: anchor/Fisher dtype must be floating, got ", t.scalar_type());
  }
}

const float* scalar_ptr(const OptTensor& t, const at::Device& dev, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  FTK_CHECK(t->device() == dev && t->scalar_type() == at::kFloat && t->numel() == 1, "ftkernels: ", what,
            " must be a float32 scalar tensor on ", dev);
  return t->data_ptr<float>();
}

template <int KIND, bool IDX>
void launch_kind(at::ScalarType pt, at::ScalarType st, const TensorMeta* metas, const BlockWork* work, int blocks,
                 const OptimHyper& h, StepScalars sc, uint64_t seed, cudaStream_t stream) {
#define FTK_LAUNCH(P, S) fused_step_kernel<KIND, P, S, IDX><<<blocks, kThreads, 0, stream>>>(metas, work, h, sc, seed)
  const bool same = pt == st;
  switch (pt) {
    case at::kFloat: FTK_LAUNCH(float, float); break;
    case at::kDouble: FTK_LAUNCH(double, double); break;
    case at::kHalf:
      if (same) FTK_LAUNCH(c10::Half, c10::Half);
      else FTK_LAUNCH(c10::Half, float);
      break;
    case at::kBFloat16:
      if (same) FTK_LAUNCH(c10::BFloat16, c10::BFloat16);
      else FTK_LAUNCH(c10::BFloat16, float);
      break;
    default: FTK_CHECK(false, "ftkernels: unsupported param dtype ", pt);
  }
#undef FTK_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool IDX>
void launch(int kind, at::ScalarType pt, at::ScalarType st, const TensorMeta* metas, const BlockWork* work,
            int blocks, const OptimHyper& h, StepScalars sc, uint64_t seed, cudaStream_t stream) {
  switch (kind) {
    case kAdamW: launch_kind<kAdamW, IDX>(pt, st, metas, work, blocks, h, sc, seed, stream); break;
    case kSGD: launch_kind<kSGD, IDX>(pt, st, metas, work, blocks, h, sc, seed, stream); break;
    case kAdagrad: launch_kind<kAdagrad, IDX>(pt, st, metas, work, blocks, h, sc, seed, stream); break;
    default: launch_kind<kRMSprop, IDX>(pt, st, metas, work, blocks, h, sc, seed, stream); break;
  }
}

}  // namespace

std::vector<at::Tensor> fused_optim_step_cuda(const OptimArgs& a) {
  const at::Device dev = a.params[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  StepScalars sc{scalar_ptr(a.lr, dev, "lr"), scalar_ptr(a.grad_scale, dev, "grad_scale"),
                 scalar_ptr(a.skip, dev, "found_inf"), scalar_ptr(a.total_norm, dev, "total_norm"), nullptr};
  if (a.seed_tensor.has_value() && a.seed_tensor->defined()) {
    const at::Tensor& t = *a.seed_tensor;
    FTK_CHECK(t.device() == dev && t.scalar_type() == at::kLong && t.numel() == 1,
              "ftkernels: seed_tensor must be an int64 scalar tensor on ", dev);
    sc.seed = t.data_ptr<int64_t>();
  }
  const OptimHyper& h = a.hyper;

  // Group tensors by (param dtype, state dtype): one launch per group.
  struct Group {
    at::ScalarType pt, st;
    bool indexed;
    std::vector<TensorMeta> metas;
    std::vector<BlockWork> work;
  };
  std::vector<Group> groups;
  for (size_t i = 0; i < a.params.size(); ++i) {
    const at::Tensor& p = a.params[i];
    TensorMeta m{};
    m.p = p.data_ptr();
    m.g = a.grads[i].data_ptr();
    at::ScalarType st = p.scalar_type();
    const size_t vec_bytes = kIlp * p.element_size();
    bool aligned = true;
    auto check_align = [&](const void* ptr, size_t bytes) {
      aligned = aligned && reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
    };
    check_align(m.p, vec_bytes);
    check_align(m.g, vec_bytes);
    void** slots[3] = {&m.s1, &m.s2, &m.s3};
    const OptTensorList* lists[3] = {&a.s1, &a.s2, &a.s3};
    for (int k = 0; k < 3; ++k) {
      if (const at::Tensor* t = get(*lists[k], i)) {
        *slots[k] = t->data_ptr();
        if (k == 0) st = t->scalar_type();
        FTK_CHECK(t->scalar_type() == st, "ftkernels: optimizer states of one param differ in dtype");
        check_align(t->data_ptr(), kIlp * t->element_size());
      }
    }
    FTK_CHECK(st == p.scalar_type() || st == at::kFloat,
              "ftkernels: optimizer state must be float32 or the param's dtype");
    if (const at::Tensor* t = get(a.masters, i)) {
      m.master = t->data_ptr<float>();
      check_align(m.master, kIlp * sizeof(float));
    }
    if (const at::Tensor* t = get(a.masks, i)) m.mask = t->data_ptr<uint8_t>();
    if (const at::Tensor* t = get(a.anchors, i)) m.anchor = t->data_ptr(), m.anchor_type = aux_type(*t);
    if (const at::Tensor* t = get(a.fishers, i)) m.fisher = t->data_ptr(), m.fisher_type = aux_type(*t);
    FTK_CHECK(!(h.l2sp != 0 || h.ewc != 0) || m.anchor, "ftkernels: L2-SP/EWC needs an anchor for param ", i);
    FTK_CHECK(h.ewc == 0 || m.fisher, "ftkernels: EWC needs a Fisher diagonal for param ", i);
    FTK_CHECK(a.steps[i].device() == dev, "ftkernels: step of param ", i, " must be on ", dev);
    m.step = a.steps[i].data_ptr<float>();
    m.numel = p.numel();
    if (const at::Tensor* t = get(a.indices, i)) {
      m.index = t->data_ptr(), m.index64 = t->scalar_type() == at::kLong, m.numel = t->numel();
    }
    const bool indexed = m.index != nullptr;
    m.tensor_id = static_cast<uint32_t>(a.tensor_ids[i]);
    m.aligned = aligned;
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const Group& gr) { return gr.pt == p.scalar_type() && gr.st == st && gr.indexed == indexed; });
    if (it == groups.end()) {
      groups.push_back(Group{p.scalar_type(), st, indexed, {}, {}});
      it = groups.end() - 1;
    }
    const int32_t t = static_cast<int32_t>(it->metas.size());
    it->metas.push_back(m);
    const int64_t chunks = (m.numel + kChunk - 1) / kChunk;
    FTK_CHECK(chunks < INT32_MAX, "ftkernels: tensor too large");
    for (int64_t c = 0; c < chunks; ++c) it->work.push_back(BlockWork{t, static_cast<int32_t>(c)});
  }

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  std::vector<at::Tensor> keep;  // under capture: the pinned metadata each replay copies again
  for (const Group& gr : groups) {
    // Metadata goes host -> device in one pinned, stream-ordered copy.
    const size_t meta_bytes = gr.metas.size() * sizeof(TensorMeta);
    const size_t work_bytes = gr.work.size() * sizeof(BlockWork);
    at::Tensor host = at::empty({static_cast<int64_t>(meta_bytes + work_bytes)},
                                at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), gr.metas.data(), meta_bytes);
    std::memcpy(static_cast<uint8_t*>(host.data_ptr()) + meta_bytes, gr.work.data(), work_bytes);
    at::Tensor dev_buf = host.to(dev, /*non_blocking=*/true);
    // A captured copy re-reads `host` at every replay: freed now, the pinned allocator would hand
    // it to the next step's metadata and the replay would launch on another step's pointers.
    if (capture != cudaStreamCaptureStatusNone) keep.push_back(host);
    const auto* metas = reinterpret_cast<const TensorMeta*>(dev_buf.data_ptr());
    const auto* work = reinterpret_cast<const BlockWork*>(static_cast<uint8_t*>(dev_buf.data_ptr()) + meta_bytes);
    const int blocks = static_cast<int>(gr.work.size());
    const uint64_t seed = static_cast<uint64_t>(a.seed);
    if (blocks > 0) {
      if (gr.indexed)
        launch<true>(h.kind, gr.pt, gr.st, metas, work, blocks, h, sc, seed, stream);
      else
        launch<false>(h.kind, gr.pt, gr.st, metas, work, blocks, h, sc, seed, stream);
    }
    const int n = static_cast<int>(gr.metas.size());
    step_count_kernel<<<(n + 255) / 256, 256, 0, stream>>>(metas, n, sc.skip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return keep;
}

}  // namespace ftk
