// Row conversions between the hidden states' dtype and the float accumulators, for the CPU kernels.
//
// c10::BFloat16 and c10::Half convert one element per call (Half in software, BFloat16 with a NaN
// branch), which the compiler does not vectorize. These overloads do the same conversions on the
// raw bits, in loops that vectorize:
//   bfloat16 -> float: the 16 bits become the high half of the float (exact);
//   float -> bfloat16: round to nearest, ties to even, and any NaN becomes the quiet NaN 0x7FC0 —
//                      bit for bit what c10::BFloat16(float) gives.
// Other pairs (float16, double, same type) use static_cast.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa_dispatch.h"
#include "simd_lanes.h"

namespace reft_ext {

// dst[j] = src[j] for j < n, from scalar_t to acc_t.
template <typename scalar_t, typename acc_t>
REFT_ROW_INLINE void widen(const scalar_t* __restrict__ src, int64_t n, acc_t* __restrict__ dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
}

REFT_ROW_INLINE void widen(const c10::BFloat16* __restrict__ src, int64_t n,
                           float* __restrict__ dst) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t word = static_cast<uint32_t>(bits[j]) << 16;
    std::memcpy(dst + j, &word, sizeof(word));
  }
}

// dst[j] = src[j] for j < n, from acc_t to scalar_t.
template <typename acc_t, typename scalar_t>
REFT_ROW_INLINE void narrow(const acc_t* __restrict__ src, int64_t n, scalar_t* __restrict__ dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

REFT_ROW_INLINE void narrow(const float* __restrict__ src, int64_t n,
                            c10::BFloat16* __restrict__ dst) {
  auto* bits = reinterpret_cast<uint16_t*>(dst);
  for (int64_t j = 0; j < n; ++j) {
    uint32_t word;
    std::memcpy(&word, src + j, sizeof(word));
    const uint32_t rounded = (word + 0x7FFFu + ((word >> 16) & 1u)) >> 16;
    bits[j] = src[j] != src[j] ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  }
}

// dst[0 .. V) = the V lanes of v, in scalar_t.
template <typename scalar_t, typename acc_t>
REFT_ROW_INLINE void narrow_vec(vec_t<acc_t> v, scalar_t* __restrict__ dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    store_vec(dst, v);
  } else {
    acc_t values[Vec<acc_t>::kLanes];
    store_vec(values, v);
    narrow(values, Vec<acc_t>::kLanes, dst);
  }
}

// The same rounding as narrow(float -> bfloat16) on a whole vector, so it stays in registers.
template <>
REFT_ROW_INLINE void narrow_vec<c10::BFloat16, float>(vec_t<float> v,
                                                      c10::BFloat16* __restrict__ dst) {
  typedef uint32_t words_t __attribute__((vector_size(kVectorBytes)));
  typedef uint16_t halves_t __attribute__((vector_size(kVectorBytes / 2)));
  words_t word;
  std::memcpy(&word, &v, sizeof(word));
  const words_t rounded = (word + 0x7FFFu + ((word >> 16) & 1u)) >> 16;
  const words_t quiet_nan = {0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0};
  const words_t bits = v != v ? quiet_nan : rounded;
  const halves_t out = __builtin_convertvector(bits, halves_t);
  std::memcpy(dst, &out, sizeof(out));
}

}  // namespace reft_ext
