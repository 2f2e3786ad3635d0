// The retraction's d-long passes on the CPU (retraction_cpu.cpp's team): max |R|, the Gram matrix
// R Rᵀ and the triangular solve R ← L⁻¹ R, on compiler vector types (simd_lanes.h) so that the
// running values stay in registers. The CUDA team splits the same passes over a block
// (csrc/retraction.h has the shared control flow).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../retraction.h"
#include "isa_dispatch.h"
#include "simd_lanes.h"

namespace reft_ext {
namespace cpu {

// max |x[e]| over e < n, NaN when one of them is NaN. The NaN-propagating floating-point maxima of
// retraction::max_abs_strided do not vectorize well with GCC (19× slower here); an integer maximum
// does. With the sign bit cleared, the unsigned order of IEEE-754 bit patterns is the order of |x|
// and every NaN pattern lies above Inf's, so the largest pattern is max |x| when all are finite,
// Inf when the largest is infinite, and a NaN when any element is NaN.
template <typename acc_t>
REFT_ROW_INLINE acc_t max_abs(const acc_t* x, int64_t n) {
  static_assert(std::is_same_v<acc_t, float> || std::is_same_v<acc_t, double>);
  using word_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  typedef word_t words_t __attribute__((vector_size(kVectorBytes)));
  constexpr int W = kVectorBytes / sizeof(acc_t);
  constexpr int kUnroll = 4;  // independent maxima: the loads, not the max latency, bound it
  const word_t magnitude = ~(word_t{1} << (8 * sizeof(word_t) - 1));
  const words_t mask = words_t{} + magnitude;
  words_t largest[kUnroll] = {};
  int64_t e = 0;
  for (; e + kUnroll * W <= n; e += kUnroll * W) {
    for (int u = 0; u < kUnroll; ++u) {
      words_t bits;
      std::memcpy(&bits, x + e + u * W, sizeof(bits));
      bits &= mask;
      largest[u] = largest[u] > bits ? largest[u] : bits;
    }
  }
  word_t best = 0;
  for (int u = 0; u < kUnroll; ++u) {
    for (int v = 0; v < W; ++v) best = std::max<word_t>(best, largest[u][v]);
  }
  for (; e < n; ++e) {
    word_t bits;
    std::memcpy(&bits, x + e, sizeof(bits));
    best = std::max<word_t>(best, bits & magnitude);
  }
  acc_t value;
  std::memcpy(&value, &best, sizeof(value));
  return value;
}

// Number of values gram() accumulates in: a vector's lanes per pair j <= i (float or double alike:
// sized for the larger lane count). Plain values, not vec_t: a std::vector of a vector type drops
// its 32-byte alignment (GCC ignores the attribute in a template argument).
inline int64_t gram_lane_count(int64_t r) { return r * (r + 1) / 2 * Vec<float>::kLanes; }

// S = R Rᵀ (r×r, both triangles) of the row-major r×d R. Columns are taken in chunks whose r rows
// stay in L1 while every pair (i, j) of the chunk is accumulated (a pair at a time over whole rows
// read each row r times from L2), four pairs (i, j..j+3) per sweep so that each strip of row i
// feeds four FMAs. lanes: gram_lane_count(r) values holding the pairs' running sums between
// chunks. Each entry is the fixed-order lane sum of lanes that run in column order: deterministic.
template <typename acc_t>
REFT_ROW_INLINE void gram(const acc_t* R, acc_t* S, int64_t r, int64_t d, acc_t* lanes) {
  using vec = vec_t<acc_t>;
  constexpr int V = Vec<acc_t>::kLanes;
  const int64_t full = d - d % V;
  const int64_t chunk = std::max<int64_t>(V, (16384 / sizeof(acc_t) / r) / V * V);
  for (int64_t p = 0; p < r * (r + 1) / 2 * V; ++p) lanes[p] = acc_t(0);
  for (int64_t c0 = 0; c0 < full; c0 += chunk) {
    const int64_t c1 = std::min(c0 + chunk, full);
    for (int64_t i = 0; i < r; ++i) {
      const acc_t* x = R + i * d;
      acc_t* row = lanes + i * (i + 1) / 2 * V;  // the pairs (i, 0..i)
      int64_t j = 0;
      for (; j + 4 <= i + 1; j += 4) {
        vec a0 = load_vec(row + j * V), a1 = load_vec(row + (j + 1) * V);
        vec a2 = load_vec(row + (j + 2) * V), a3 = load_vec(row + (j + 3) * V);
        const acc_t* y = R + j * d;
        for (int64_t c = c0; c < c1; c += V) {
          const vec xc = load_vec(x + c);
          a0 += xc * load_vec(y + c);
          a1 += xc * load_vec(y + d + c);
          a2 += xc * load_vec(y + 2 * d + c);
          a3 += xc * load_vec(y + 3 * d + c);
        }
        store_vec(row + j * V, a0);
        store_vec(row + (j + 1) * V, a1);
        store_vec(row + (j + 2) * V, a2);
        store_vec(row + (j + 3) * V, a3);
      }
      for (; j <= i; ++j) {
        vec a = load_vec(row + j * V);
        const acc_t* y = R + j * d;
        for (int64_t c = c0; c < c1; c += V) a += load_vec(x + c) * load_vec(y + c);
        store_vec(row + j * V, a);
      }
    }
  }
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      acc_t value = reduce_vec<acc_t>(load_vec(lanes + (i * (i + 1) / 2 + j) * V));
      for (int64_t c = full; c < d; ++c) value += R[i * d + c] * R[j * d + c];
      S[i * r + j] = value;
      S[j * r + i] = value;
    }
  }
}

// R ← L⁻¹ R for the lower-triangular r×r L, by forward substitution on blocks of kSolveVectors
// register-wide strips: R[i, c] = (R[i, c] − Σ_{m<i} L[i, m] R[m, c]) / L[i, i], the sum in m
// order (the same operations in the same order as retraction::solve_lower_block). Eight independent
// strips hide the FMA latency of each strip's chain over m, and the r rows of a 64-column block
// stay in L1.
constexpr int kSolveVectors = 8;

template <typename acc_t>
REFT_ROW_INLINE void solve_lower(const acc_t* L, acc_t* R, int64_t r, int64_t d) {
  using vec = vec_t<acc_t>;
  constexpr int V = Vec<acc_t>::kLanes, W = kSolveVectors * V;
  int64_t j = 0;
  for (; j + W <= d; j += W) {
    for (int64_t i = 0; i < r; ++i) {
      vec value[kSolveVectors];
      for (int u = 0; u < kSolveVectors; ++u) value[u] = load_vec(R + i * d + j + u * V);
      for (int64_t m = 0; m < i; ++m) {
        const acc_t factor = L[i * r + m];
        for (int u = 0; u < kSolveVectors; ++u) {
          value[u] -= factor * load_vec(R + m * d + j + u * V);
        }
      }
      const acc_t inverse = acc_t(1) / L[i * r + i];
      for (int u = 0; u < kSolveVectors; ++u) store_vec(R + i * d + j + u * V, value[u] * inverse);
    }
  }
  if (j < d) retraction::solve_lower_columns<1>(L, R, r, d, j, d);  // the last < W columns
}

}  // namespace cpu
}  // namespace reft_ext
