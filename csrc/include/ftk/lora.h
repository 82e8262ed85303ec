// The LoRA dropout stream, shared by the CPU kernel and (re-implemented bit for bit) by the Triton
// kernels: element (m, k) of the input x viewed as [M, K] takes 16 bits of the Philox block at
// counter (k / 8, m, kLoraStream, tag), key = the call's 64-bit seed: word (k % 8) / 2, low half
// first. Rows start new groups, so a row's mask does not depend on K's alignment. Kept iff
// draw >= dropout_threshold(p); kept values are scaled by 1 / (1 - p) (PEFT's nn.Dropout).
#pragma once
#include "philox.h"

namespace ftk {

constexpr uint32_t kLoraStream = 0x4C6F5241u;  // "LoRA": separates it from optimizer tensor ids

// dropout_counter() puts the group's low word in x and its high word in y: (k / 8, m).
FTK_HD uint64_t lora_dropout_group(uint64_t row, uint64_t k) { return (row << 32) | (k >> 3); }

}  // namespace ftk
