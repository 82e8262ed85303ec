// Philox4x32-10 counter-based RNG (Salmon et al., SC'11), identical on host and device, so a
// gradient-dropout mask is a pure function of (seed, tensor id, element index): nothing stored,
// same bits on CPU and CUDA.
#pragma once
#include "macros.h"

#include <cstring>

#if defined(__AVX2__) && !defined(FTK_DEVICE_CODE)
#include <immintrin.h>
#endif

namespace ftk {

struct U32x4 {
  uint32_t x, y, z, w;
};

FTK_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Philox4x32 round multipliers and Weyl key increments.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

FTK_HD U32x4 philox4x32_10(U32x4 ctr, uint32_t k0, uint32_t k1) {
#if defined(FTK_DEVICE_CODE)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo32(kPhiloxM0, ctr.x, &hi0);
    uint32_t lo1 = mulhilo32(kPhiloxM1, ctr.z, &hi1);
    ctr = U32x4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return ctr;
}

// The gradient-dropout stream: element e of tensor `tensor_id` uses 16 bits of the Philox block
// at counter (e / 8, tensor_id, tag): word (e % 8) / 2, low half first. One call serves 8
// elements; the keep test `u >= p` then has a resolution of 2^-16 in p.
FTK_HD U32x4 dropout_counter(uint32_t tensor_id, uint64_t group) {
  return U32x4{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), tensor_id, 0x46544B31u};
}

FTK_HD U32x4 philox_dropout_words(uint64_t seed, uint32_t tensor_id, uint64_t group) {
  return philox4x32_10(dropout_counter(tensor_id, group), static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

FTK_HD float uniform16(uint32_t word, bool high) {
  return static_cast<float>(high ? (word >> 16) : (word & 0xFFFFu)) * (1.0f / 65536.0f);
}

// Lane 0..7's 16-bit draw of a group's words: kept iff >= dropout_threshold(p).
FTK_HD uint32_t dropout_draw16(const U32x4& r, int lane) {
  const int k = lane >> 1;
  const uint32_t word = k == 0 ? r.x : k == 1 ? r.y : k == 2 ? r.z : r.w;
  return (lane & 1) ? (word >> 16) : (word & 0xFFFFu);
}

// Lane 0..7 of a group's words as a uniform in [0, 1) (the draw / 65536, as uniform16).
FTK_HD float dropout_uniform(const U32x4& r, int lane) {
  return static_cast<float>(dropout_draw16(r, lane)) * (1.0f / 65536.0f);
}

// Ten Philox rounds on B counters held as structure of arrays (host only). With AVX2, 8 lanes at
// a time: _mm256_mul_epu32 gives the 32x32->64 products of the even lanes, a 32-bit shift feeds
// it the odd ones; GCC does not vectorize the portable loop's rounds by itself.
template <int B>
inline void philox_rounds_soa(uint32_t* x, uint32_t* y, uint32_t* z, uint32_t* w, uint32_t k0, uint32_t k1) {
#if defined(__AVX2__) && !defined(FTK_DEVICE_CODE)
  static_assert(B % 8 == 0, "AVX2 rounds take 8 lanes at a time");
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int l = 0; l < B; l += 8) {
    __m256i vx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + l));
    __m256i vy = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + l));
    __m256i vz = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(z + l));
    __m256i vw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + l));
    uint32_t a = k0, b = k1;
    for (int round = 0; round < 10; ++round) {
      const __m256i p0e = _mm256_mul_epu32(vx, m0), p0o = _mm256_mul_epu32(_mm256_srli_epi64(vx, 32), m0);
      const __m256i p1e = _mm256_mul_epu32(vz, m1), p1o = _mm256_mul_epu32(_mm256_srli_epi64(vz, 32), m1);
      const __m256i lo0 = _mm256_blend_epi32(p0e, _mm256_slli_epi64(p0o, 32), 0xAA);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(p0e, 32), p0o, 0xAA);
      const __m256i lo1 = _mm256_blend_epi32(p1e, _mm256_slli_epi64(p1o, 32), 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(p1e, 32), p1o, 0xAA);
      vx = _mm256_xor_si256(_mm256_xor_si256(hi1, vy), _mm256_set1_epi32(static_cast<int>(a)));
      vz = _mm256_xor_si256(_mm256_xor_si256(hi0, vw), _mm256_set1_epi32(static_cast<int>(b)));
      vy = lo1;
      vw = lo0;
      a += kPhiloxW0;
      b += kPhiloxW1;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + l), vx);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + l), vy);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(z + l), vz);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + l), vw);
  }
#else
  for (int l = 0; l < B; ++l) {
    const U32x4 r = philox4x32_10(U32x4{x[l], y[l], z[l], w[l]}, k0, k1);
    x[l] = r.x, y[l] = r.y, z[l] = r.z, w[l] = r.w;
  }
#endif
}

// The 16-bit dropout draws of `ngroups` consecutive groups into out[8 * ngroups] (host only):
// out[8 g + k] is element 8 g + k's draw, i.e. the words stored in order and read as uint16
// (little-endian: low half first). Element kept iff draw >= ceil(p * 65536), the same test as
// dropout_uniform(...) >= p.
inline void philox_dropout_block(uint64_t seed, uint32_t tensor_id, uint64_t group0, int ngroups, uint16_t* out) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "draws are read as the low then high half");
  constexpr int B = 16;
  for (int q0 = 0; q0 < ngroups; q0 += B) {
    alignas(32) uint32_t x[B], y[B], z[B], w[B];
    for (int l = 0; l < B; ++l) {
      const U32x4 ctr = dropout_counter(tensor_id, group0 + static_cast<uint64_t>(q0 + l));
      x[l] = ctr.x, y[l] = ctr.y, z[l] = ctr.z, w[l] = ctr.w;
    }
    philox_rounds_soa<B>(x, y, z, w, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    const int n = ngroups - q0 < B ? ngroups - q0 : B;
    for (int l = 0; l < n; ++l) {
      const uint32_t words[4] = {x[l], y[l], z[l], w[l]};
      std::memcpy(out + 8 * (q0 + l), words, sizeof(words));  // memcpy: no aliasing of uint16 by uint32
    }
  }
}

// The integer form of the keep test: draw >= dropout_threshold(p) <=> draw / 65536 >= p.
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(std::ceil(static_cast<double>(static_cast<float>(p)) * 65536.0));
}

}  // namespace ftk
