// Matrix routines of the orthogonal retraction, shared by the CPU and CUDA back-ends.
//
// A retraction maps R (r×d, r ≤ d, row-major) to a matrix with orthonormal rows. Every method
// first factors R = T Q with Q orthonormal rows and T (r×r) lower triangular with a positive
// diagonal:
//   - CholeskyQR2: twice { S = R Rᵀ; S = L Lᵀ; R ← L⁻¹ R }, T = L₁ L₂. Needs S safely positive
//     definite (κ(R) well below u^-1/2); otherwise
//   - Householder QR of Rᵀ, signs fixed so that diag(T) > 0, which is stable for any R (zero or
//     repeated rows included: its Q is orthonormal whatever the rank).
// Both give the same Q (the unique QR factor with positive diag(T)), so "cholqr2" and "qr" keep the
// row space. "polar" then replaces Q by polar(T) Q = (R Rᵀ)^-1/2 R, the closest matrix with
// orthonormal rows, with polar(T) from Newton's iteration X ← (X + X⁻ᵀ)/2 on the r×r factor.
//
// The routines are single-threaded on one matrix, except those taking (begin, Step) column ranges,
// which a CUDA block splits over its threads (the CUDA block runs its own parallel forms of the
// r×r ones: cuda/retraction_parallel.cuh); retract_matrix is the control flow of both back-ends.
// All arithmetic is in acc_t (float or double).
#pragma once

#include <cmath>
#include <cstdint>

#include "lowrank_edit.h"

namespace reft_ext {
namespace retraction {

enum Method : int64_t { kCholQR2 = 0, kQR = 1, kPolar = 2 };

template <typename acc_t>
REFT_HD acc_t unit_roundoff() {
  return sizeof(acc_t) == 8 ? acc_t(1.1102230246251565e-16) : acc_t(5.9604645e-08);
}

// Cholesky S = L Lᵀ of the r×r symmetric S, in place (lower triangle; the upper is zeroed).
// False when a pivot is at most min_ratio times its diagonal entry: a pivot ratio near 1/κ(R)²
// means CholeskyQR would lose orthogonality (see cholqr_min_pivot_ratio).
template <typename acc_t>
REFT_HD bool cholesky_lower(acc_t* S, int64_t r, acc_t min_ratio) {
  for (int64_t j = 0; j < r; ++j) {
    acc_t pivot = S[j * r + j];
    const acc_t scale = pivot;
    for (int64_t m = 0; m < j; ++m) pivot -= S[j * r + m] * S[j * r + m];
    if (!(scale > acc_t(0)) || !(pivot > min_ratio * scale)) return false;
    const acc_t diagonal = std::sqrt(pivot);
    S[j * r + j] = diagonal;
    for (int64_t i = j + 1; i < r; ++i) {
      acc_t value = S[i * r + j];
      for (int64_t m = 0; m < j; ++m) value -= S[i * r + m] * S[j * r + m];
      S[i * r + j] = value / diagonal;
    }
    for (int64_t i = 0; i < j; ++i) S[i * r + j] = acc_t(0);
  }
  return true;
}

// Pivot-ratio bounds of the two CholeskyQR passes. Pass 1 accepts κ(R) up to about u^-1/4 (64 in
// float32, 1e4 in float64), where its output is orthonormal to about √u and pass 2 restores
// rounding-level orthonormality; harder inputs go to Householder QR. Pass 2 expects a Gram matrix
// near the identity. R Rᵀ of a typical optimizer step has κ ≈ 1, far inside both bounds.
template <typename acc_t>
REFT_HD acc_t cholqr_min_pivot_ratio(int pass) {
  return pass == 0 ? std::sqrt(unit_roundoff<acc_t>()) : acc_t(0.5);
}

// 2^-e with 2^e the power of two just above |x| (x finite, nonzero), as two factors whose product
// it is: a single 2^-e overflows when x is subnormal (e below -126 in float32, -1022 in float64).
template <typename acc_t>
REFT_HD void inverse_power_of_two(acc_t x, acc_t* first, acc_t* second) {
  int exponent = 0;
  std::frexp(x, &exponent);
  *first = std::ldexp(acc_t(1), -exponent / 2);
  *second = std::ldexp(acc_t(1), -exponent + exponent / 2);
}

// R ← 2^-e R with 2^e the power of two just above max|R| (exact), when max|R| lies outside
// [2^-50, 2^50]: the Gram matrix and the Householder norms then neither overflow nor underflow (in
// float32 too, for d up to 2^20; subnormal R included). Inside that range, the common case, R is
// left as it is. Orthonormal factors are scale-invariant.
template <typename acc_t>
REFT_HD void normalize_scale(acc_t* R, int64_t n, acc_t max_abs, int64_t begin, int64_t step) {
  const acc_t low = std::ldexp(acc_t(1), -50), high = std::ldexp(acc_t(1), 50);
  if (!(max_abs > acc_t(0)) || (max_abs >= low && max_abs <= high)) return;
  acc_t first, second;
  inverse_power_of_two(max_abs, &first, &second);
  for (int64_t e = begin; e < n; e += step) R[e] = R[e] * first * second;
}

// The larger of a and b, NaN when either is NaN (std::fmax would drop it).
template <typename acc_t>
REFT_HD acc_t max_or_nan(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

// max |x[e]| over x[begin], x[begin + step], ... < n; NaN when one of them is NaN: each CUDA
// thread's share of the retraction's first pass (the CPU's is cpu::max_abs, an integer maximum).
template <typename acc_t>
REFT_HD acc_t max_abs_strided(const acc_t* x, int64_t n, int64_t begin, int64_t step) {
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t e = begin;
  for (; e + (kLanes - 1) * step < n; e += kLanes * step) {
    for (int v = 0; v < kLanes; ++v) lanes[v] = max_or_nan(std::fabs(x[e + v * step]), lanes[v]);
  }
  for (; e < n; e += step) lanes[0] = max_or_nan(std::fabs(x[e]), lanes[0]);
  acc_t largest = 0;
  for (int v = 0; v < kLanes; ++v) largest = max_or_nan(lanes[v], largest);
  return largest;
}

// Forward substitution on the W columns j, j + Step, ..., j + (W − 1)·Step of R:
// R[i, c] = (R[i, c] − Σ_{m<i} L[i, m] R[m, c]) / L[i, i], the sum taken in m order, so every
// element sees the same operations whichever thread or block width runs its column. The W running
// values stay in registers (the CPU vectorizes them for W = 16) and each element is written once.
template <int W, int Step, typename acc_t>
REFT_HD void solve_lower_block(const acc_t* L, acc_t* R, int64_t r, int64_t d, int64_t j) {
  for (int64_t i = 0; i < r; ++i) {
    acc_t value[W];
    REFT_UNROLL
    for (int w = 0; w < W; ++w) value[w] = R[i * d + j + w * Step];
    for (int64_t m = 0; m < i; ++m) {
      const acc_t factor = L[i * r + m];
      REFT_UNROLL
      for (int w = 0; w < W; ++w) value[w] -= factor * R[m * d + j + w * Step];
    }
    const acc_t inverse = acc_t(1) / L[i * r + i];
    REFT_UNROLL
    for (int w = 0; w < W; ++w) R[i * d + j + w * Step] = value[w] * inverse;
  }
}

// R ← L⁻¹ R for the lower-triangular L (r×r), on the columns begin, begin + Step, ... < end: in
// blocks of 16 adjacent columns on the CPU (Step = 1), one column per thread on CUDA, then the
// remaining columns one at a time.
template <int Step, typename acc_t>
REFT_HD void solve_lower_columns(const acc_t* L, acc_t* R, int64_t r, int64_t d, int64_t begin,
                                 int64_t end) {
  constexpr int kBlock = Step == 1 ? 16 : 1;
  int64_t j = begin;
  for (; j + (kBlock - 1) * Step < end; j += kBlock * Step) {
    solve_lower_block<kBlock, Step>(L, R, r, d, j);
  }
  for (; j < end; j += Step) solve_lower_block<1, Step>(L, R, r, d, j);
}

// C = A B for r×r A, B (C distinct from both).
template <typename acc_t>
REFT_HD void matmul_small(const acc_t* A, const acc_t* B, acc_t* C, int64_t r) {
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      acc_t value = 0;
      for (int64_t m = 0; m < r; ++m) value += A[i * r + m] * B[m * r + j];
      C[i * r + j] = value;
    }
  }
}

// Householder QR of Rᵀ on the r×d row-major R: R ← Q (orthonormal rows), T ← lower-triangular
// factor with R_in = T Q and diag(T) ≥ 0. work: r×d scratch for the Householder vectors.
template <typename acc_t>
REFT_HD void householder_rows(acc_t* R, acc_t* T, acc_t* work, int64_t r, int64_t d) {
  for (int64_t j = 0; j < r; ++j) {
    // v = x / max|x| before squaring, so that tiny remainders (a rank-deficient R) still give an
    // accurately orthogonal reflector.
    acc_t* v = work + j * d;
    acc_t largest = 0;
    for (int64_t c = j; c < d; ++c) largest = std::fmax(largest, std::fabs(R[j * d + c]));
    for (int64_t c = 0; c < d; ++c) v[c] = acc_t(0);
    if (largest == acc_t(0)) continue;  // zero column: the identity reflector (v stays zero)
    acc_t norm2 = 0;
    for (int64_t c = j; c < d; ++c) {
      v[c] = R[j * d + c] / largest;
      norm2 += v[c] * v[c];
    }
    v[j] += v[j] >= acc_t(0) ? std::sqrt(norm2) : -std::sqrt(norm2);
    acc_t beta = 0;
    for (int64_t c = j; c < d; ++c) beta += v[c] * v[c];
    for (int64_t i = j; i < r; ++i) {
      acc_t dot = 0;
      for (int64_t c = j; c < d; ++c) dot += v[c] * R[i * d + c];
      const acc_t factor = acc_t(2) * dot / beta;
      for (int64_t c = j; c < d; ++c) R[i * d + c] -= factor * v[c];
    }
  }
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < r; ++j) T[i * r + j] = j <= i ? R[i * d + j] : acc_t(0);
  }
  // Q's rows: e_i with the reflectors applied last to first.
  for (int64_t i = 0; i < r; ++i) {
    acc_t* q = R + i * d;
    for (int64_t c = 0; c < d; ++c) q[c] = c == i ? acc_t(1) : acc_t(0);
    for (int64_t j = r - 1; j >= 0; --j) {
      const acc_t* v = work + j * d;
      acc_t beta = 0, dot = 0;
      for (int64_t c = j; c < d; ++c) {
        beta += v[c] * v[c];
        dot += v[c] * q[c];
      }
      if (beta == acc_t(0)) continue;
      const acc_t factor = acc_t(2) * dot / beta;
      for (int64_t c = j; c < d; ++c) q[c] -= factor * v[c];
    }
  }
  // Signs: diag(T) ≥ 0 makes Q unique (the same Q as CholeskyQR's).
  for (int64_t j = 0; j < r; ++j) {
    if (T[j * r + j] < acc_t(0)) {
      for (int64_t i = j; i < r; ++i) T[i * r + j] = -T[i * r + j];
      for (int64_t c = 0; c < d; ++c) R[j * d + c] = -R[j * d + c];
    }
  }
}

// Inverse of the r×r A by Gauss-Jordan with partial pivoting: A is destroyed, inv receives A⁻¹.
// False when A is numerically singular.
template <typename acc_t>
REFT_HD bool invert_small(acc_t* A, acc_t* inv, int64_t r) {
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j) inv[i * r + j] = i == j ? acc_t(1) : acc_t(0);
  for (int64_t c = 0; c < r; ++c) {
    int64_t pivot = c;
    for (int64_t i = c + 1; i < r; ++i)
      if (std::fabs(A[i * r + c]) > std::fabs(A[pivot * r + c])) pivot = i;
    if (A[pivot * r + c] == acc_t(0)) return false;
    for (int64_t j = 0; j < r; ++j) {
      const acc_t a = A[c * r + j], b = inv[c * r + j];
      A[c * r + j] = A[pivot * r + j];
      inv[c * r + j] = inv[pivot * r + j];
      A[pivot * r + j] = a;
      inv[pivot * r + j] = b;
    }
    const acc_t scale = acc_t(1) / A[c * r + c];
    for (int64_t j = 0; j < r; ++j) {
      A[c * r + j] *= scale;
      inv[c * r + j] *= scale;
    }
    for (int64_t i = 0; i < r; ++i) {
      if (i == c) continue;
      const acc_t factor = A[i * r + c];
      for (int64_t j = 0; j < r; ++j) {
        A[i * r + j] -= factor * A[c * r + j];
        inv[i * r + j] -= factor * inv[c * r + j];
      }
    }
  }
  return true;
}

// X ← polar factor of the lower-triangular r×r X by Newton's iteration X ← (γX + X⁻ᵀ/γ)/2 with
// Higham's scaling γ = (‖X⁻¹‖_F / ‖X‖_F)^1/2 (dropped near convergence). work: 2·r×r. Returns false
// and leaves the result undefined when X is numerically singular (diagonal ratio below √u: the
// polar factor of a rank-deficient R is not unique) or the iteration does not settle.
template <typename acc_t>
REFT_HD bool polar_small(acc_t* X, acc_t* work, int64_t r) {
  acc_t smallest = std::fabs(X[0]), largest = std::fabs(X[0]);
  for (int64_t i = 1; i < r; ++i) {
    smallest = std::fmin(smallest, std::fabs(X[i * r + i]));
    largest = std::fmax(largest, std::fabs(X[i * r + i]));
  }
  if (!(smallest > std::sqrt(unit_roundoff<acc_t>()) * largest)) return false;
  // polar(c X) = polar(X) for c > 0: X scaled to max|X_ii| ≈ 1 (exactly, by powers of two) keeps
  // the scaling γ's ‖X⁻¹‖²/‖X‖² (the 4th power of X's scale) inside float32's range.
  acc_t first, second;
  inverse_power_of_two(largest, &first, &second);
  for (int64_t e = 0; e < r * r; ++e) X[e] = X[e] * first * second;
  acc_t* A = work;
  acc_t* inv = work + r * r;
  const acc_t tolerance = acc_t(4) * static_cast<acc_t>(r) * unit_roundoff<acc_t>();
  bool scaled = true;
  for (int iteration = 0; iteration < 50; ++iteration) {
    for (int64_t e = 0; e < r * r; ++e) A[e] = X[e];
    if (!invert_small(A, inv, r)) return false;
    acc_t gamma = 1;
    if (scaled) {
      acc_t x2 = 0, inv2 = 0;
      for (int64_t e = 0; e < r * r; ++e) {
        x2 += X[e] * X[e];
        inv2 += inv[e] * inv[e];
      }
      gamma = std::sqrt(std::sqrt(inv2 / x2));
    }
    acc_t change = 0, size = 0;
    for (int64_t i = 0; i < r; ++i) {
      for (int64_t j = 0; j < r; ++j) {
        const acc_t next = acc_t(0.5) * (gamma * X[i * r + j] + inv[j * r + i] / gamma);
        change += (next - X[i * r + j]) * (next - X[i * r + j]);
        size += next * next;
        X[i * r + j] = next;
      }
    }
    if (change <= acc_t(1e-4) * size) scaled = false;
    if (change <= tolerance * tolerance * size) return true;
  }
  return false;
}

// out ← X R for the r×r X, on columns begin, begin + Step, ... < d (out distinct from R).
template <int Step, typename acc_t>
REFT_HD void apply_left_columns(const acc_t* X, const acc_t* R, acc_t* out, int64_t r, int64_t d,
                                int64_t begin) {
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = begin; j < d; j += Step) out[i * d + j] = acc_t(0);
    for (int64_t m = 0; m < r; ++m) {
      const acc_t factor = X[i * r + m];
      for (int64_t j = begin; j < d; j += Step) out[i * d + j] += factor * R[m * d + j];
    }
  }
}

template <typename acc_t>
REFT_HD void set_identity(acc_t* X, int64_t r) {
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j) X[i * r + j] = i == j ? acc_t(1) : acc_t(0);
}

// T ← T F for r×r matrices; tmp: r×r scratch.
template <typename acc_t>
REFT_HD void multiply_into(acc_t* T, const acc_t* F, acc_t* tmp, int64_t r) {
  matmul_small(T, F, tmp, r);
  for (int64_t e = 0; e < r * r; ++e) T[e] = tmp[e];
}

// The r×r scratch of one retraction, carved from small_scratch_size(r) values; the CPU and CUDA
// back-ends use the same layout. (It also needs r×d values of `work` for Householder and polar.)
template <typename acc_t>
struct SmallScratch {
  acc_t* S;    // Gram matrix, then its Cholesky factor (or Householder's T)
  acc_t* T;    // accumulated triangular factor: R_in = T Q (polar only)
  acc_t* tmp;  // 2 r×r: products (1 r×r), then the polar iteration (2 r×r)
  REFT_HD SmallScratch(acc_t* small, int64_t r)
      : S(small), T(small + r * r), tmp(small + 2 * r * r) {}
};

REFT_HD int64_t small_scratch_size(int64_t r) { return 4 * r * r; }

// Retracts one r×d matrix in place, with the method's fallbacks described above: the one control
// flow of both back-ends. `team` says who does what:
//   - team.leader(): true on the one thread that runs the Householder fallback (and sets T up);
//     team.sync(): a barrier of the team;
//   - team.first(), team.stride(): this thread's share of elementwise passes (e = first, first +
//     stride, ...);
//   - team.max_abs(R, n), team.gram(R, S, r, d), team.solve_lower(L, R, r, d) (R ← L⁻¹ R) and
//     team.apply_left(X, R, work, r, d) (R ← X R through work): the d-long passes, each thread on
//     its share, the result (max_abs's value, S) seen by every thread after the next sync;
//   - team.cholesky(S, r, min_ratio) (cholesky_lower), team.multiply_into(T, F, tmp, r) and
//     team.polar(X, work, r) (polar_small): the r×r factorizations, run by the whole team, their
//     result seen by every thread on return and their bool the same on every thread.
// The CPU's team is one thread running the serial routines above (retraction_cpu.cpp), CUDA's a
// block running their parallel forms (retraction_cuda.cu, cuda/retraction_parallel.cuh).
//
// Returns false when R holds NaN or Inf (found by the max-abs pass that starts the retraction, so
// at no extra cost): R is then left as it was when `keep_non_finite` (the op's check_finite: the
// caller raises), else filled with NaN (no orthonormal matrix is meant, and an unrelated
// valid-looking one would hide that).
template <typename acc_t, typename Team>
REFT_HD bool retract_matrix(const Team& team, acc_t* R, int64_t r, int64_t d, Method method,
                            acc_t* work, acc_t* small, bool keep_non_finite) {
  const SmallScratch<acc_t> scratch(small, r);
  acc_t *S = scratch.S, *T = scratch.T, *tmp = scratch.tmp;
  const bool polar = method == kPolar;
  if (polar && team.leader()) set_identity(T, r);
  const acc_t max_abs = team.max_abs(R, r * d);
  if (!std::isfinite(max_abs)) {
    if (!keep_non_finite) {
      for (int64_t e = team.first(); e < r * d; e += team.stride()) R[e] = acc_t(NAN);
    }
    return false;
  }
  normalize_scale(R, r * d, max_abs, team.first(), team.stride());
  int passes = 0;
  if (method != kQR) {
    for (; passes < 2; ++passes) {
      team.sync();  // the scaled (or last pass's solved) R is complete
      team.gram(R, S, r, d);
      team.sync();
      if (!team.cholesky(S, r, cholqr_min_pivot_ratio<acc_t>(passes))) break;
      if (polar) team.multiply_into(T, S, tmp, r);  // R_in = T Q accumulates T ← T L
      team.solve_lower(S, R, r, d);
    }
  }
  team.sync();
  if (passes < 2) {
    if (team.leader()) householder_rows(R, S, work, r, d);
    team.sync();
    if (polar) team.multiply_into(T, S, tmp, r);
  }
  if (polar && team.polar(T, tmp, r)) team.apply_left(T, R, work, r, d);
  return true;
}

}  // namespace retraction
}  // namespace reft_ext
