// The r×r factorizations of the retraction (csrc/retraction.h) spread over a CUDA block:
// Cholesky, the product T ← T F and the polar iteration with its Gauss-Jordan inverse. BlockTeam
// (retraction_cuda.cu) calls them from retract_matrix where the CPU's one-thread team calls the
// serial routines; every thread of the block calls each routine (Threads = blockDim.x), and each
// returns with its result visible to the whole block and any bool it returns the same on every
// thread (it is computed from values all threads read after a barrier), so the block never
// diverges around a barrier.
//
// Determinism: no atomics; every entry is computed by one thread in a fixed order and every sum
// is a per-thread partial, a butterfly and the warps' sums in warp order, so the bits do not
// depend on the schedule. Cholesky and the product keep the serial routines' order of operations
// per entry; the polar iteration's norms are summed in another (fixed) order than the CPU's.
//
// The matrices live where the caller's scratch is (global memory, L1-cached): r has no upper bound
// besides r ≤ d, so nothing here is sized by r.
#pragma once

#include <cmath>
#include <cstdint>

#include "../retraction.h"
#include "warp_reduce.cuh"

namespace reft_ext {
namespace retraction {

// *a and *b summed over the block, returned to every thread: warp butterflies, then the warps'
// sums added in warp order (a fixed order: deterministic). Used by block_polar for its norms.
template <int Threads, typename acc_t>
__device__ void block_sum_pair(acc_t* a, acc_t* b) {
  constexpr int kWarps = Threads / 32;
  __shared__ acc_t partial[2][kWarps];
  const acc_t warp_a = warp_sum(*a), warp_b = warp_sum(*b);
  if (threadIdx.x % 32 == 0) {
    partial[0][threadIdx.x / 32] = warp_a;
    partial[1][threadIdx.x / 32] = warp_b;
  }
  __syncthreads();
  acc_t total_a = 0, total_b = 0;
  for (int w = 0; w < kWarps; ++w) {
    total_a += partial[0][w];
    total_b += partial[1][w];
  }
  __syncthreads();  // every thread has read `partial` before the next call writes it
  *a = total_a;
  *b = total_b;
}

// Cholesky S = L Lᵀ of the r×r symmetric S in place (lower triangle; the upper is zeroed), on the
// block; the serial cholesky_lower's pivot test and, but for FMA contraction, its bits
// (BlockTeam::cholesky runs it where the CPU team runs cholesky_lower). Right-looking: step j
// scales column j below the diagonal by √pivot (phase 1), then the threads update their entries of
// the trailing lower triangle, S[i, k] −= L[i, j] L[k, j], and one of them stores the diagonal
// (phase 2). Each entry so receives the serial routine's subtractions in the same (j) order. Two
// barriers per column.
template <int Threads, typename acc_t>
__device__ bool block_cholesky_lower(acc_t* S, int64_t r, acc_t min_ratio) {
  // The pivot test compares each pivot with its original diagonal entry, which the updates
  // overwrite: S[0, j] (upper triangle, unused until it is zeroed) keeps it for j ≥ 1.
  for (int64_t j = 1 + threadIdx.x; j < r; j += Threads) S[j] = S[j * r + j];
  __syncthreads();
  for (int64_t j = 0; j < r; ++j) {
    const acc_t pivot = S[j * r + j];
    const acc_t scale = j == 0 ? pivot : S[j];
    if (!(scale > acc_t(0)) || !(pivot > min_ratio * scale)) return false;
    const acc_t diagonal = std::sqrt(pivot);
    for (int64_t i = j + 1 + threadIdx.x; i < r; i += Threads) S[i * r + j] /= diagonal;
    __syncthreads();
    if (threadIdx.x == 0) S[j * r + j] = diagonal;  // nobody reads it in this phase
    const int64_t n = r - j - 1;                    // trailing rows and columns j + 1 ... r − 1
    for (int64_t e = threadIdx.x; e < n * n; e += Threads) {
      const int64_t i = j + 1 + e / n, k = j + 1 + e % n;
      if (k <= i) S[i * r + k] -= S[i * r + j] * S[k * r + j];
    }
    __syncthreads();
  }
  for (int64_t e = threadIdx.x; e < r * r; e += Threads) {
    if (e % r > e / r) S[e] = acc_t(0);
  }
  __syncthreads();
  return true;
}

// T ← T F for the r×r T and F, on the block (BlockTeam::multiply_into): each thread computes its
// entries of T F into tmp (r×r; each a dot product in m order, as matmul_small), then, after
// every thread has read T, copies them back.
template <int Threads, typename acc_t>
__device__ void block_multiply_into(acc_t* T, const acc_t* F, acc_t* tmp, int64_t r) {
  for (int64_t e = threadIdx.x; e < r * r; e += Threads) {
    const int64_t i = e / r, j = e % r;
    acc_t value = 0;
    for (int64_t m = 0; m < r; ++m) value += T[i * r + m] * F[m * r + j];
    tmp[e] = value;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < r * r; e += Threads) T[e] = tmp[e];
  __syncthreads();
}

// Gauss-Jordan's pivot for column c of the r×r A: the row i ≥ c of the largest |A[i, c]|, the
// first on ties (as invert_small's scan), and A[pivot, c]. Warp 0 searches (lanes over rows, then
// a butterfly on a total order: NaN entries never win, so every lane agrees) and publishes the
// pair in shared memory; every thread returns it after the barrier. Called by block_invert.
template <typename acc_t>
__device__ acc_t block_pivot(const acc_t* A, int64_t r, int64_t c, int64_t* row) {
  __shared__ int pivot_row;
  __shared__ acc_t pivot_value;
  if (threadIdx.x < 32) {
    int best = static_cast<int>(c);
    acc_t largest = -1;  // below every |A[i, c]|
    for (int64_t i = c + threadIdx.x; i < r; i += 32) {
      const acc_t value = std::fabs(A[i * r + c]);
      if (value > largest) {
        largest = value;
        best = static_cast<int>(i);
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const acc_t other = __shfl_xor_sync(0xffffffffu, largest, offset);
      const int other_row = __shfl_xor_sync(0xffffffffu, best, offset);
      if (other > largest || (other == largest && other_row < best)) {
        largest = other;
        best = other_row;
      }
    }
    if (threadIdx.x == 0) {
      pivot_row = best;
      pivot_value = A[best * r + c];
    }
  }
  __syncthreads();
  *row = pivot_row;
  return pivot_value;
}

// inv ← A⁻¹ for the r×r A by Gauss-Jordan with partial pivoting on the block (A is destroyed),
// the block form of invert_small; false (on every thread) when A is numerically singular. Per
// column c: the pivot search, then the row swap and scaling (threads over columns), then the
// elimination of every other row (threads over entries). A's columns ≤ c are not updated once
// eliminated (they are those of the identity), so the elimination reads column c while it writes
// only columns > c: three barriers per column, no race.
template <int Threads, typename acc_t>
__device__ bool block_invert(acc_t* A, acc_t* inv, int64_t r) {
  for (int64_t e = threadIdx.x; e < r * r; e += Threads) {
    inv[e] = e / r == e % r ? acc_t(1) : acc_t(0);
  }
  __syncthreads();
  for (int64_t c = 0; c < r; ++c) {
    int64_t p;
    const acc_t pivot = block_pivot(A, r, c, &p);
    if (pivot == acc_t(0)) return false;
    const acc_t scale = acc_t(1) / pivot;
    // Row p first: when p = c the scaled row is the one that stays.
    for (int64_t j = threadIdx.x; j < r; j += Threads) {
      const acc_t a = inv[c * r + j], b = inv[p * r + j];
      inv[p * r + j] = a;
      inv[c * r + j] = b * scale;
      if (j >= c) {
        const acc_t x = A[c * r + j], y = A[p * r + j];
        A[p * r + j] = x;
        A[c * r + j] = y * scale;
      }
    }
    __syncthreads();
    const int64_t a_columns = r - c - 1, width = a_columns + r;  // A's columns > c, then inv's
    for (int64_t e = threadIdx.x; e < r * width; e += Threads) {
      const int64_t i = e / width, j = e % width;
      if (i == c) continue;
      const acc_t factor = A[i * r + c];
      if (j < a_columns) {
        A[i * r + c + 1 + j] -= factor * A[c * r + c + 1 + j];
      } else {
        inv[i * r + j - a_columns] -= factor * inv[c * r + j - a_columns];
      }
    }
    __syncthreads();
  }
  return true;
}

// The polar factor of the lower-triangular r×r X in place, on the block: polar_small's Newton
// iteration X ← (γX + X⁻ᵀ/γ)/2 with Higham's scaling, the same tests and tolerances, its inverse
// by block_invert. work: 2·r×r (A, then A⁻¹). Every thread updates the entries e ≡ threadIdx.x
// (mod Threads) of X, so between iterations only the inverse and the norms need a barrier. False
// (on every thread) when X is numerically singular or the iteration does not settle.
template <int Threads, typename acc_t>
__device__ bool block_polar(acc_t* X, acc_t* work, int64_t r) {
  acc_t smallest = std::fabs(X[0]), largest = std::fabs(X[0]);
  for (int64_t i = 1; i < r; ++i) {  // on every thread: the test's outcome is the block's
    smallest = std::fmin(smallest, std::fabs(X[i * r + i]));
    largest = std::fmax(largest, std::fabs(X[i * r + i]));
  }
  if (!(smallest > std::sqrt(unit_roundoff<acc_t>()) * largest)) return false;
  __syncthreads();  // every thread has read the diagonal before X is scaled
  acc_t first, second;
  inverse_power_of_two(largest, &first, &second);
  acc_t* A = work;
  acc_t* inv = work + r * r;
  const acc_t tolerance = acc_t(4) * static_cast<acc_t>(r) * unit_roundoff<acc_t>();
  bool scaled = true;
  for (int64_t e = threadIdx.x; e < r * r; e += Threads) X[e] = X[e] * first * second;
  for (int iteration = 0; iteration < 50; ++iteration) {
    for (int64_t e = threadIdx.x; e < r * r; e += Threads) A[e] = X[e];
    __syncthreads();
    if (!block_invert<Threads>(A, inv, r)) return false;
    acc_t gamma = 1;
    if (scaled) {
      acc_t x2 = 0, inv2 = 0;
      for (int64_t e = threadIdx.x; e < r * r; e += Threads) {
        x2 += X[e] * X[e];
        inv2 += inv[e] * inv[e];
      }
      block_sum_pair<Threads>(&x2, &inv2);
      gamma = std::sqrt(std::sqrt(inv2 / x2));
    }
    acc_t change = 0, size = 0;
    for (int64_t e = threadIdx.x; e < r * r; e += Threads) {
      const int64_t i = e / r, j = e % r;
      const acc_t next = acc_t(0.5) * (gamma * X[e] + inv[j * r + i] / gamma);
      change += (next - X[e]) * (next - X[e]);
      size += next * next;
      X[e] = next;
    }
    block_sum_pair<Threads>(&change, &size);  // (its barriers also publish X)
    if (change <= acc_t(1e-4) * size) scaled = false;
    if (change <= tolerance * tolerance * size) return true;
  }
  return false;
}

}  // namespace retraction
}  // namespace reft_ext
