// CPU helpers shared by the kernels that apply the LoRA dropout stream (ftk/lora.h) row by row.
#pragma once
#include <algorithm>
#include <cstdint>

#include "lora.h"

namespace ftk {

// Rows per block of a row-blocked pass over a [M, K] matrix: a few [rows, K] fp32/fp64 buffers (the
// dropped block, its keep multipliers, a rank-r product) stay within ~768 KiB (measured on 2 EPYC
// cores at K=1024: 64 rows beat 21 by ~7% of the LoRA forward: fewer, fuller BLAS calls).
inline int64_t rows_per_block(int64_t K) {
  return std::clamp<int64_t>((768 * 1024) / (12 * std::max<int64_t>(K, 1)), 1, 64);
}

// The 16-bit draws of elements (row, 0..K-1) of the stream of `seed` into draws[8 * ceil(K / 8)]:
// element (row, k) is kept iff draws[k] >= dropout_threshold(p).
inline void lora_row_draws(uint64_t seed, int64_t row, int64_t K, uint16_t* draws) {
  philox_dropout_block(seed, kLoraStream, lora_dropout_group(static_cast<uint64_t>(row), 0),
                       static_cast<int>((K + 7) / 8), draws);
}

// mult[k] = inv_keep where the stream of `seed` keeps element (row, k), else 0: branch-free, so the
// loops that multiply by it vectorize. `draws` holds 8 * ceil(K / 8) entries.
template <typename Acc>
inline void keep_multipliers(uint64_t seed, int64_t row, int64_t K, uint32_t thr, Acc inv_keep, Acc* mult,
                             uint16_t* draws) {
  lora_row_draws(seed, row, K, draws);
  for (int64_t k = 0; k < K; ++k) mult[k] = draws[k] >= thr ? inv_keep : Acc(0);
}

}  // namespace ftk
