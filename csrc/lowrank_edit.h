// Row math of the low-rank edit  out = x + (x Pᵀ + b) Q,  shared by the CPU and CUDA back-ends.
//
// Both back-ends walk a row of width d in "strips" of V consecutive elements and build every
// quantity of the forward and backward pass from three strip operations:
//   dot     lane[v] += x[v] * w[v]    (projections z = P x, gz = Q g)
//   axpy    y[v]    += a * w[v]       (edits x + zᵀQ, g + gzᵀP; ∂P += gz hᵀ, ∂Q += z gᵀ)
//   sum     fixed-order pairwise sum of the V lanes
// The CUDA kernels use the array forms below (dot_lanes, axpy_lanes, load/store_strip), which nvcc
// keeps in registers. On the CPU the same operations are written on compiler vector types
// (csrc/cpu/simd_lanes.h): GCC vectorizes the array forms call by call but keeps the arrays on the
// stack between calls. Both end with sum_lanes, so every sum runs in a fixed order and results are
// deterministic.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define REFT_HD __host__ __device__ __forceinline__
#define REFT_UNROLL _Pragma("unroll")
#else
// always_inline: the CPU kernels' per-ISA entry points must compile this math for their own ISA.
#define REFT_HD inline __attribute__((always_inline))
#define REFT_UNROLL _Pragma("GCC unroll 16")
#endif

namespace reft_ext {

// Accumulation type: float for float/half/bfloat16 rows, double for double rows (the rule of
// accumulation_dtype in csrc/dtypes.h, as a type for kernel code).
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

template <int V, typename acc_t>
REFT_HD void dot_lanes(acc_t* __restrict__ lane, const acc_t* __restrict__ x,
                       const acc_t* __restrict__ w) {
  REFT_UNROLL
  for (int v = 0; v < V; ++v) lane[v] += x[v] * w[v];
}

template <int V, typename acc_t>
REFT_HD void axpy_lanes(acc_t* __restrict__ y, acc_t a, const acc_t* __restrict__ w) {
  REFT_UNROLL
  for (int v = 0; v < V; ++v) y[v] += a * w[v];
}

// Pairwise tree over the lanes (V a power of two), in place: the same order on every call.
template <int V, typename acc_t>
REFT_HD acc_t sum_lanes(acc_t* lane) {
  REFT_UNROLL
  for (int width = V / 2; width > 0; width /= 2) {
    REFT_UNROLL
    for (int v = 0; v < width; ++v) lane[v] += lane[v + width];
  }
  return lane[0];
}

template <int V, typename scalar_t, typename acc_t>
REFT_HD void load_strip(acc_t* __restrict__ x, const scalar_t* __restrict__ src) {
  REFT_UNROLL
  for (int v = 0; v < V; ++v) x[v] = static_cast<acc_t>(src[v]);
}

template <int V, typename scalar_t, typename acc_t>
REFT_HD void store_strip(scalar_t* __restrict__ dst, const acc_t* __restrict__ x) {
  REFT_UNROLL
  for (int v = 0; v < V; ++v) dst[v] = static_cast<scalar_t>(x[v]);
}

REFT_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Parameter gradients ∂P = gzᵀ h and ∂Q = zᵀ g reduce over the N rows in two deterministic stages:
// each group of `rows_per_partial` rows writes an fp32 (fp64) partial of size r×d, then the
// partials are summed in group order. The group size depends only on the shape, never on the thread
// count or the device, so results repeat bit for bit. A group of at least 32·r rows keeps the
// partial traffic (r·d accumulators per group) a small fraction of the group's own rows; at most
// 256 groups bound the partial buffer by 256·2·r·d elements.
REFT_HD int64_t rows_per_partial(int64_t n_rows, int64_t rank) {
  constexpr int64_t kMinRows = 128;
  constexpr int64_t kMaxPartials = 256;
  int64_t rows = 32 * rank > kMinRows ? 32 * rank : kMinRows;
  const int64_t spread = ceil_div(n_rows, kMaxPartials);
  return rows > spread ? rows : spread;
}

}  // namespace reft_ext
