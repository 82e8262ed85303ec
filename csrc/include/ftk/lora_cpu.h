// CPU helper shared by the kernels that apply the LoRA dropout stream (ftk/lora.h) row by row.
#pragma once
#include <cstdint>

#include "lora.h"

namespace ftk {

// mult[k] = inv_keep where the stream of `seed` keeps element (row, k), else 0: branch-free, so the
// loops that multiply by it vectorize. `draws` holds 8 * ceil(K / 8) entries.
template <typename Acc>
inline void keep_multipliers(uint64_t seed, int64_t row, int64_t K, uint32_t thr, Acc inv_keep, Acc* mult,
                             uint16_t* draws) {
  philox_dropout_block(seed, kLoraStream, lora_dropout_group(static_cast<uint64_t>(row), 0),
                       static_cast<int>((K + 7) / 8), draws);
  for (int64_t k = 0; k < K; ++k) mult[k] = draws[k] >= thr ? inv_keep : Acc(0);
}

}  // namespace ftk
