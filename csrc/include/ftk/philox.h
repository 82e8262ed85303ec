// Philox4x32-10 counter-based RNG (Salmon et al., SC'11), identical on host and device, so a
// gradient-dropout mask is a pure function of (seed, tensor id, element index): nothing stored,
// same bits on CPU and CUDA.
#pragma once
#include "macros.h"

namespace ftk {

struct U32x4 {
  uint32_t x, y, z, w;
};

FTK_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

FTK_HD U32x4 philox4x32_10(U32x4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(FTK_DEVICE_CODE)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo32(M0, ctr.x, &hi0);
    uint32_t lo1 = mulhilo32(M1, ctr.z, &hi1);
    ctr = U32x4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
    k0 += W0;
    k1 += W1;
  }
  return ctr;
}

// Four uniforms in [0, 1) for elements 4*group .. 4*group+3 of tensor `tensor_id`.
// 24 random bits each: exactly representable in float.
struct Uniform4 {
  float v[4];
};

FTK_HD Uniform4 philox_uniform4(uint64_t seed, uint32_t tensor_id, uint64_t group) {
  U32x4 ctr{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), tensor_id, 0x46544B31u};
  U32x4 r = philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  constexpr float inv = 1.0f / 16777216.0f;
  return Uniform4{{(r.x >> 8) * inv, (r.y >> 8) * inv, (r.z >> 8) * inv, (r.w >> 8) * inv}};
}

// Uniforms of `ngroups` consecutive groups into out[4 * ngroups] (host only). The same rounds
// as philox4x32_10, written lane-parallel over 16 counters (structure of arrays) so the compiler
// vectorizes them (vpmuludq for the 32x32->64 products): several times the scalar rate.
inline void philox_uniform_block(uint64_t seed, uint32_t tensor_id, uint64_t group0, int ngroups, float* out) {
  constexpr int B = 16;
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr float inv = 1.0f / 16777216.0f;
  for (int q0 = 0; q0 < ngroups; q0 += B) {
    uint32_t x[B], y[B], z[B], w[B];
    for (int l = 0; l < B; ++l) {
      const uint64_t grp = group0 + static_cast<uint64_t>(q0 + l);
      x[l] = static_cast<uint32_t>(grp);
      y[l] = static_cast<uint32_t>(grp >> 32);
      z[l] = tensor_id;
      w[l] = 0x46544B31u;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      for (int l = 0; l < B; ++l) {
        const uint64_t p0 = static_cast<uint64_t>(M0) * x[l];
        const uint64_t p1 = static_cast<uint64_t>(M1) * z[l];
        const uint32_t nx = static_cast<uint32_t>(p1 >> 32) ^ y[l] ^ k0;
        const uint32_t nz = static_cast<uint32_t>(p0 >> 32) ^ w[l] ^ k1;
        y[l] = static_cast<uint32_t>(p1);
        w[l] = static_cast<uint32_t>(p0);
        x[l] = nx;
        z[l] = nz;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const int n = ngroups - q0 < B ? ngroups - q0 : B;
    for (int l = 0; l < n; ++l) {
      float* o = out + 4 * (q0 + l);
      o[0] = (x[l] >> 8) * inv;
      o[1] = (y[l] >> 8) * inv;
      o[2] = (z[l] >> 8) * inv;
      o[3] = (w[l] >> 8) * inv;
    }
  }
}

}  // namespace ftk
