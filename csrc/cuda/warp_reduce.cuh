// Warp-level reduction shared by the CUDA kernels: a butterfly over the 32 lanes, so every lane
// ends with the same total and the order of additions is fixed (deterministic).
#pragma once

namespace reft_ext {

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

}  // namespace reft_ext
