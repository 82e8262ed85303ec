// Host entry points of the C++ autograd nodes (csrc/autograd/): eager-mode graph nodes with no
// Python in forward or backward, for the calls whose kernels are all ATen or C++.
#pragma once
#include <torch/types.h>

#include <vector>

namespace ftk {

// x rebuilt from what its producers keep (ftkernels/ops/input_recompute.py): a postfix program over
// `kept` (opcodes below), evaluated with autograd and autocast off.
namespace rebuild_op {
enum : int64_t { kTensor = 0, kGelu = 1, kSilu = 2, kMul = 3, kTo = 4, kLayerNorm = 5 };
}
at::Tensor rebuild_input(const std::vector<int64_t>& program, const std::vector<at::Tensor>& kept);

// Whether t's storage still holds every element t addresses (sharded data-parallel wrappers resize
// gathered parameters' storages to 0 between uses): checked when a plan is made and at the rebuild.
bool storage_ok(const at::Tensor& t);

// G fused LoRA Linear layers on one x [..., K] as one autograd node (G = 1: a single layer):
// y_i = x W_i^T + b_i + s_i (D_i(x) A_i^T) B_i^T. biases holds the present biases, bias_of[i] the
// index of member i's (-1: none). seeds: int64 scalars on x's device (dropout > 0: the mask's key).
// With a non-empty program, x is not kept: `kept` and the program rebuild it in backward. CPU calls
// run the CPU kernels unless dense_cpu (tests): then the GEMM route that other devices take.
std::vector<at::Tensor> lora_linear_node(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                         const std::vector<at::Tensor>& biases,
                                         const std::vector<at::Tensor>& lora_as,
                                         const std::vector<at::Tensor>& lora_bs, const std::vector<int64_t>& bias_of,
                                         const std::vector<double>& scalings, const std::vector<double>& dropouts,
                                         const std::vector<at::Tensor>& seeds, const std::vector<at::Tensor>& kept,
                                         const std::vector<int64_t>& program, bool dense_cpu = false);

}  // namespace ftk
