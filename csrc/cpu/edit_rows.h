// Row kernels of the low-rank edit on the CPU, shared by the single-adapter ops
// (lowrank_edit_cpu.cpp) and the multi-adapter ops (lowrank_edit_multi_cpu.cpp): rows taken in
// blocks of kRowBlock, walked in register-wide strips (csrc/cpu/simd_lanes.h), visited in the order
// the caller gives. The accumulation types, the fixed-order lane sum and the deterministic
// partial-sum grouping come from csrc/lowrank_edit.h, as in the CUDA kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../activation.h"
#include "../lowrank_edit.h"
#include "convert.h"
#include "isa_dispatch.h"
#include "simd_lanes.h"

namespace reft_ext {
namespace cpu {

// The row in accumulation precision: the row itself when it already is, else converted into buffer.
template <typename scalar_t, typename acc_t>
REFT_ROW_INLINE const acc_t* row_as_acc(const scalar_t* row, int64_t d, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    widen(row, d, buffer);
    return buffer;
  }
}

// a·b + c rounded once, for the scalar tails (the columns past the last full strip). Written out:
// left to the compiler's contraction, the AVX-512 build vectorized a tail's products and added
// them unfused, so its sums differed in the last bit from the AVX2 build's (tested now). One
// instruction in the FMA builds, a libm call in the portable one (tails only: < 8 columns a row).
template <typename acc_t>
REFT_ROW_INLINE acc_t fused_multiply_add(acc_t a, acc_t b, acc_t c) {
  return std::fma(a, b, c);
}

// Rows are processed in blocks of kRowBlock: each strip of P, Q and of the partial sums is loaded
// once per block instead of once per row, which keeps those r×d matrices out of the row's way.
constexpr int kRowBlock = 4;
// The backward pass adds each block's rows into the r×d partial sums of ∂P and ∂Q, which do not
// fit in L1 beside the rows: blocks of 8 rows halve that partial traffic per row. (Its projections
// and edits still go 4 rows at a time, which keeps their accumulators in registers.)
constexpr int kBackwardRowBlock = 8;

// The projections sweep the rows once per pair of ranks, the parameter sums once per rank. Swept
// whole, 4 rows of d = 2048 floats (32 KiB) and the two rows of P leave L1 before the next pair
// comes back to them; swept in column chunks of kColumnChunk (4 rows: 8 KiB), every pair of a rank
// group reuses the chunk from L1. Each accumulator still adds its strips in increasing column
// order, so the sums are unchanged.
constexpr int64_t kColumnChunk = 512;
// Ranks whose accumulators are kept (on the stack) across the chunks of one group.
constexpr int kRankGroup = 16;

// Strips per step of the edit (edit_strips' T): T·M accumulators, T strips of Q and a broadcast
// must fit in the vector registers. 16 (SSE2, AVX2) hold T = 2; the 32 of AVX-512 hold T = 4,
// which halves the loads of Q and z per FMA (the edit is load-bound at T = 2). The row kernels
// take it as a template argument: isa_variant gives the AVX-512 entry kWideEditStrips.
constexpr int kEditStrips = 2;
constexpr int kWideEditStrips = 4;

// Ranks per sweep of the projections (project_strips' K) in the kernels of edit step T: each
// loaded strip of a row feeds K·M accumulators. 16 registers hold K = 2; 32 hold K = 4, one sweep
// of the rows at r = 4 instead of two (fp32 and bf16 forward 3–5 % faster, N 8192, r 4).
constexpr int project_ranks(int T) { return T == kWideEditStrips ? 4 : 2; }

// lane[q][i] += the strips [j0, j1) of x[i] times P's row k + q, for q < K and the M rows x[i].
template <int M, int K, typename acc_t>
REFT_ROW_INLINE void project_strips(const acc_t* const* x, const acc_t* P, int64_t d, int64_t k,
                                    int64_t j0, int64_t j1, vec_t<acc_t> (*lane)[M]) {
  constexpr int V = Vec<acc_t>::kLanes;
  vec_t<acc_t> acc[K][M];
  for (int q = 0; q < K; ++q) {
    for (int i = 0; i < M; ++i) acc[q][i] = lane[q][i];
  }
  for (int64_t j = j0; j < j1; j += V) {
    // Each row's strip is loaded once into a register and feeds K accumulators: as memory
    // operands of the FMAs it would be loaded once per rank, and the loads, not the FMAs, would
    // be the limit (10 loads per 8 FMAs at K = 2, M = 4).
    vec_t<acc_t> xj[M];
    for (int i = 0; i < M; ++i) xj[i] = load_vec_once(x[i] + j);
    for (int q = 0; q < K; ++q) {
      const vec_t<acc_t> wj = load_vec(P + (k + q) * d + j);
      for (int i = 0; i < M; ++i) acc[q][i] += xj[i] * wj;
    }
  }
  for (int q = 0; q < K; ++q) {
    for (int i = 0; i < M; ++i) lane[q][i] = acc[q][i];
  }
}

// z[i][k] = Σ_j P[k, j] x[i][j] + b[k] for the M rows x[i] and all r ranks (b may be null): per
// group of kRankGroup ranks and per column chunk, K ranks per sweep (each loaded strip of a row
// feeds K accumulators), then 2, then 1.
template <int M, int K, typename acc_t>
REFT_ROW_INLINE void project_rows(const acc_t* const* x, const acc_t* P, const acc_t* b, int64_t d,
                                  int64_t r, acc_t* const* z) {
  constexpr int V = Vec<acc_t>::kLanes;
  const int64_t full = d - d % V;
  for (int64_t k0 = 0; k0 < r; k0 += kRankGroup) {
    const int ranks = static_cast<int>(std::min<int64_t>(kRankGroup, r - k0));
    vec_t<acc_t> lane[kRankGroup][M] = {};
    for (int64_t j0 = 0; j0 < full; j0 += kColumnChunk) {
      const int64_t j1 = std::min(full, j0 + kColumnChunk);
      int q = 0;
      if constexpr (K == 4) {
        for (; q + 4 <= ranks; q += 4) project_strips<M, 4>(x, P, d, k0 + q, j0, j1, lane + q);
      }
      for (; q + 2 <= ranks; q += 2) project_strips<M, 2>(x, P, d, k0 + q, j0, j1, lane + q);
      if (q < ranks) project_strips<M, 1>(x, P, d, k0 + q, j0, j1, lane + q);
    }
    for (int q = 0; q < ranks; ++q) {
      const int64_t k = k0 + q;
      const acc_t* w = P + k * d;
      for (int i = 0; i < M; ++i) {
        acc_t tail = 0;
        for (int64_t j = full; j < d; ++j) tail = fused_multiply_add(x[i][j], w[j], tail);
        z[i][k] = reduce_vec<acc_t>(lane[q][i]) + tail + (b ? b[k] : acc_t(0));
      }
    }
  }
}

// The rows of a later block (kPrefetchBlocks ahead), prefetched a strip at a time while this
// block's edit runs: those to be read (`in`) and those to be written (`out`, so the stores find
// their lines in cache instead of waiting for them). A whole block prefetched at once fills the
// core's miss queue and stalls it until the lines arrive, so loads and FMAs did not overlap.
template <int M, typename scalar_t>
struct RowsAhead {
  const scalar_t* in[M];
  scalar_t* out[M];
};

// Prefetches the lines of elements [j, j + count) of each row of `ahead` (null: none).
template <int M, typename scalar_t>
REFT_ROW_INLINE void prefetch_columns(const RowsAhead<M, scalar_t>* ahead, int64_t j,
                                      int64_t count) {
  if (ahead == nullptr) return;
  constexpr int64_t kLineBytes = 64;
  const int64_t first = j * int64_t(sizeof(scalar_t)),
                last = (j + count) * int64_t(sizeof(scalar_t));
  for (int i = 0; i < M; ++i) {
    const char* in = reinterpret_cast<const char*>(ahead->in[i]);
    const char* out = reinterpret_cast<const char*>(ahead->out[i]);
    // Both as read prefetches: PREFETCHW (for writing) measured no faster for `out` (fp32 r 4
    // forward, N 8192, d 768 / 2048 / 4096: fused/copy 1.53 / 1.72 / 1.57× with it, 1.40 / 1.62 /
    // 1.46× without; three alternating process pairs).
    for (int64_t byte = first; byte < last; byte += kLineBytes) {
      __builtin_prefetch(in + byte, 0, 2);
      __builtin_prefetch(out + byte, 0, 2);
    }
  }
}

// The strips [j, j + T·V) of y[i] = x[i] + Σ_k z[i][k] Q[k, :] for the M rows. Each strip adds
// its r terms in order, a chain of dependent FMAs: T strips at once keep T·M chains in flight,
// enough to hide the FMA latency (4 rows alone leave the FMA units half idle at r = 16). The same
// columns of the rows ahead are prefetched.
template <int M, int T, typename scalar_t, typename acc_t>
REFT_ROW_INLINE void edit_strips(const acc_t* const* x, const acc_t* const* z, const acc_t* Q,
                                 int64_t d, int64_t r, int64_t j, scalar_t* const* y,
                                 const RowsAhead<M, scalar_t>* ahead) {
  constexpr int V = Vec<acc_t>::kLanes;
  prefetch_columns(ahead, j, T * V);
  vec_t<acc_t> strip[T][M];
  for (int t = 0; t < T; ++t) {
    for (int i = 0; i < M; ++i) strip[t][i] = load_vec(x[i] + j + t * V);
  }
  for (int64_t k = 0; k < r; ++k) {
    vec_t<acc_t> qj[T];
    for (int t = 0; t < T; ++t) qj[t] = load_vec(Q + k * d + j + t * V);
    for (int i = 0; i < M; ++i) {
      const acc_t zk = z[i][k];
      for (int t = 0; t < T; ++t) strip[t][i] += zk * qj[t];
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int i = 0; i < M; ++i) narrow_vec<scalar_t, acc_t>(strip[t][i], y[i] + j + t * V);
  }
}

// The strips [j, full) of the edit: T at a time, then the rest with T/2, T/4, ..., 1.
template <int M, int T, typename scalar_t, typename acc_t>
REFT_ROW_INLINE void edit_columns(const acc_t* const* x, const acc_t* const* z, const acc_t* Q,
                                  int64_t d, int64_t r, int64_t j, int64_t full, scalar_t* const* y,
                                  const RowsAhead<M, scalar_t>* ahead) {
  constexpr int V = Vec<acc_t>::kLanes;
  for (; j + T * V <= full; j += T * V) edit_strips<M, T>(x, z, Q, d, r, j, y, ahead);
  if constexpr (T > 1) edit_columns<M, T / 2>(x, z, Q, d, r, j, full, y, ahead);
}

// y[i] = x[i] + Σ_k z[i][k] Q[k, :] for the M rows, written in y's dtype; each strip of y once.
// Every element adds its r terms in the same order whatever T is. The rows of `ahead` (null:
// none) are prefetched on the way.
template <int M, int T, typename scalar_t, typename acc_t>
REFT_ROW_INLINE void edit_rows(const acc_t* const* x, const acc_t* const* z, const acc_t* Q,
                               int64_t d, int64_t r, scalar_t* const* y,
                               const RowsAhead<M, scalar_t>* ahead = nullptr) {
  constexpr int V = Vec<acc_t>::kLanes;
  const int64_t full = d - d % V;
  edit_columns<M, T>(x, z, Q, d, r, 0, full, y, ahead);
  for (int i = 0; i < M; ++i) {
    for (int64_t j = full; j < d; ++j) {
      acc_t value = x[i][j];
      for (int64_t k = 0; k < r; ++k) value = fused_multiply_add(z[i][k], Q[k * d + j], value);
      narrow(&value, 1, y[i] + j);
    }
  }
}

// The strips [j, j + T·V) of a += Σ_i c[i] x[i] for the M rows. Each strip's M additions are a
// dependent chain: T strips at once keep T chains in flight.
template <int M, int T, typename acc_t>
REFT_ROW_INLINE void accumulate_strips(acc_t* a, const acc_t (&c)[M], const acc_t* const (&x)[M],
                                       int64_t j) {
  constexpr int V = Vec<acc_t>::kLanes;
  vec_t<acc_t> strip[T];
  for (int t = 0; t < T; ++t) strip[t] = load_vec(a + j + t * V);
  for (int i = 0; i < M; ++i) {
    for (int t = 0; t < T; ++t) strip[t] += c[i] * load_vec(x[i] + j + t * V);
  }
  for (int t = 0; t < T; ++t) store_vec(a + j + t * V, strip[t]);
}

// acc[k, :] += Σ_i c[i][k] x[i] for every k < r: the outer-product sums of ∂P and ∂Q. By column
// chunks, as the projections: the M rows' chunk stays in L1 across the r ranks. The row pointers
// and coefficients are copied into locals first: through the caller's arrays the compiler must
// assume each store into acc may change them and reloads them for every strip.
template <int M, typename acc_t>
REFT_ROW_INLINE void accumulate_rows(acc_t* acc, const acc_t* const* c, const acc_t* const* x,
                                     int64_t d, int64_t r) {
  constexpr int V = Vec<acc_t>::kLanes;
  const int64_t full = d - d % V;
  const acc_t* xs[M];
  for (int i = 0; i < M; ++i) xs[i] = x[i];
  for (int64_t j0 = 0; j0 < full; j0 += kColumnChunk) {
    const int64_t j1 = std::min(full, j0 + kColumnChunk);
    for (int64_t k = 0; k < r; ++k) {
      acc_t* a = acc + k * d;
      acc_t ck[M];
      for (int i = 0; i < M; ++i) ck[i] = c[i][k];
      int64_t j = j0;
      for (; j + 2 * V <= j1; j += 2 * V) accumulate_strips<M, 2>(a, ck, xs, j);
      if (j < j1) accumulate_strips<M, 1>(a, ck, xs, j);
    }
  }
  for (int64_t k = 0; k < r; ++k) {
    acc_t* a = acc + k * d;
    for (int64_t j = full; j < d; ++j) {
      for (int i = 0; i < M; ++i) a[j] = fused_multiply_add(c[i][k], xs[i][j], a[j]);
    }
  }
}

// The row at sorted position n: order[n], or n itself when there is no order (every row, in turn).
REFT_ROW_INLINE int64_t row_at(const int64_t* order, int64_t n) { return order ? order[n] : n; }

// Points `ahead` at the M rows at positions [later, later + M) of `order` in `in` and `out`
// (stride d); false, and `ahead` untouched, where they do not all exist (later + M > end).
template <int M, typename scalar_t>
REFT_ROW_INLINE bool point_rows_ahead(RowsAhead<M, scalar_t>& ahead, const scalar_t* in,
                                      scalar_t* out, const int64_t* order, int64_t later,
                                      int64_t end, int64_t d) {
  if (later + M > end) return false;
  for (int i = 0; i < M; ++i) {
    const int64_t row = row_at(order, later + i);
    ahead.in[i] = in + row * d;
    ahead.out[i] = out + row * d;
  }
  return true;
}

// Row buffers of one thread: rows converted to the accumulation dtype (when h is not already in
// it) and the projections of each row of a block (`per_row` values each).
template <typename scalar_t, typename acc_t>
struct RowScratch {
  static constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  std::vector<acc_t> rows;
  std::vector<acc_t> projections;
  // Room for `n_rows` converted rows and the projections of a block of `block_rows`.
  RowScratch(int64_t n_rows, int64_t block_rows, int64_t d, int64_t per_row)
      : rows(kConvert ? n_rows * d : 0), projections(block_rows * per_row) {}
  // Pointers to the rows at positions [n, n + M) of `order` in src (stride d), converted into
  // slot `slot` when needed.
  template <int M>
  REFT_ROW_INLINE void view(const scalar_t* src, const int64_t* order, int64_t n, int64_t d,
                            int slot, const acc_t** out) {
    for (int i = 0; i < M; ++i) {
      out[i] = row_as_acc(src + row_at(order, n + i) * d, d,
                          kConvert ? rows.data() + (slot * M + i) * d : nullptr);
    }
  }
};

// The activated edit (lowrank_edit_act): P has rp rows (r, or 2r when a projection is
// subtracted), v = h Pᵀ + b (N, rp) is kept beside z = act(u) − s (N, r), csrc/activation.h.
// Null v: the plain edit, z = h Pᵀ + b with rp = r.
template <typename acc_t>
struct Activated {
  acc_t* v = nullptr;  // (N, rp): written by the forward, read by the backward
  int64_t rp = 0;
  Activation act = Activation::kIdentity;
};

// Pointers and sizes of one forward call. Rows are visited at positions [begin, end) of `order`
// (null: rows begin..end themselves); P, Q, b are the factors of the adapter those rows share.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
struct ForwardArgs {
  const scalar_t* h;
  const acc_t *P, *Q, *b;
  scalar_t* out;
  acc_t* z;
  int64_t d, r;
  const int64_t* order = nullptr;
  Activated<acc_t> activated = {};
  int64_t rp() const { return activated.v ? activated.rp : r; }  // rows of P (and of b)
};

// Pointers and sizes of one backward call. grad_h null: ∂h is not wanted (its pass is skipped);
// want_P/Q/b false: that parameter's outer-product sums are skipped.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
struct BackwardArgs {
  const scalar_t *grad_out, *h;
  const acc_t *P, *Q, *z;
  scalar_t* grad_h;
  bool want_P, want_Q, want_b;
  int64_t d, r;
  const int64_t* order = nullptr;  // as in ForwardArgs
  Activated<acc_t> activated = {};
  int64_t rp() const { return activated.v ? activated.rp : r; }
};

// Size of one group's partial sums: [∂P (rp×d) | ∂Q (r×d) | ∂b (rp)].
REFT_ROW_INLINE int64_t partial_size(int64_t rp, int64_t r, int64_t d) { return (rp + r) * d + rp; }

// Forward on M rows from n: z = x Pᵀ + b (activated: v = x Pᵀ + b, z = act(u) − s), out = x + z Q,
// prefetching the rows of `ahead` (null: none).
template <int M, int T, typename scalar_t, typename acc_t>
REFT_ROW_INLINE void forward_block(RowScratch<scalar_t, acc_t>& scratch,
                                   const ForwardArgs<scalar_t>& a, int64_t n,
                                   const RowsAhead<M, scalar_t>* ahead) {
  const Activated<acc_t>& act = a.activated;
  const acc_t* x[M];
  acc_t* zi[M];
  acc_t* vi[M];
  scalar_t* y[M];
  scratch.template view<M>(a.h, a.order, n, a.d, 0, x);
  for (int i = 0; i < M; ++i) {
    const int64_t row = row_at(a.order, n + i);
    zi[i] = a.z + row * a.r;
    vi[i] = act.v ? act.v + row * act.rp : zi[i];
    y[i] = a.out + row * a.d;
  }
  project_rows<M, project_ranks(T)>(x, a.P, a.b, a.d, a.rp(), vi);
  if (act.v) {
    for (int i = 0; i < M; ++i) activated_z(act.act, vi[i], a.r, act.rp, zi[i]);
  }
  edit_rows<M, T>(x, zi, a.Q, a.d, a.r, y, ahead);
}

// Blocks ahead whose rows are prefetched (into L2): the rows are the only data that comes from
// memory, and the hardware prefetcher does not run ahead across the compute between two blocks,
// so without this every block starts by waiting for its rows (a fifth of the bf16 forward at
// N 8192, d 768, r 16). Two blocks ahead measured best (1: a little less, 4: the same). Spread
// over the edit (RowsAhead), the output rows included, instead of all at once before each block:
// fp32 r 4 forward 11–25 % faster (N 8192, d 768–4096).
constexpr int kPrefetchBlocks = 2;

// Prefetches (into L2) the M rows at positions [n, n + M) of `order` in src (stride d), where they
// exist (n + M ≤ end).
template <int M, typename scalar_t>
REFT_ROW_INLINE void prefetch_rows(const scalar_t* src, const int64_t* order, int64_t n,
                                   int64_t end, int64_t d) {
  if (n + M > end) return;
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int i = 0; i < M; ++i) {
    const scalar_t* row = src + row_at(order, n + i) * d;
    for (int64_t j = 0; j < d; j += kLine) __builtin_prefetch(row + j, 0, 2);
  }
}

// Forward on the rows at positions [begin, end); T: the edit's strips per step (kEditStrips, or
// kWideEditStrips where 32 vector registers exist).
template <typename scalar_t, int T = kEditStrips, typename acc_t = acc_type<scalar_t>>
REFT_ROW_INLINE void forward_rows(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  RowScratch<scalar_t, acc_t> scratch(kRowBlock, kRowBlock, a.d, a.r);
  RowsAhead<kRowBlock, scalar_t> ahead;
  int64_t n = begin;
  for (; n + kRowBlock <= end; n += kRowBlock) {
    const int64_t later = n + kPrefetchBlocks * kRowBlock;
    const bool prefetch = point_rows_ahead(ahead, a.h, a.out, a.order, later, end, a.d);
    forward_block<kRowBlock, T>(scratch, a, n, prefetch ? &ahead : nullptr);
  }
  for (; n < end; ++n) {
    forward_block<1, T>(scratch, a, n, static_cast<const RowsAhead<1, scalar_t>*>(nullptr));
  }
}

// Backward on M rows from n: gz = g Qᵀ and c = ∂v (c = gz for the plain edit, activated_coef
// otherwise), ∂h = g + c P, and ∂P += cᵀ h, ∂Q += zᵀ g, ∂b += Σ c into `partial` (partial_size
// layout), each only where wanted.
template <int M, int T, typename scalar_t, typename acc_t>
REFT_ROW_INLINE void backward_block(RowScratch<scalar_t, acc_t>& scratch,
                                    const BackwardArgs<scalar_t>& a, acc_t* partial, int64_t n,
                                    const RowsAhead<M, scalar_t>* ahead) {
  const Activated<acc_t>& act = a.activated;
  const int64_t d = a.d, r = a.r, rp = a.rp();
  const acc_t* g[M];
  const acc_t* x[M];
  const acc_t* zi[M];
  acc_t* gz[M];
  acc_t* coef[M];
  scratch.template view<M>(a.grad_out, a.order, n, d, 0, g);
  for (int i = 0; i < M; ++i) {
    zi[i] = a.z + row_at(a.order, n + i) * r;
    gz[i] = scratch.projections.data() + i * r;
    coef[i] = act.v ? scratch.projections.data() + M * r + i * rp : gz[i];
  }
  constexpr int S = M < kRowBlock ? M : kRowBlock;  // rows per projection and edit
  if (a.grad_h || a.want_P || a.want_b) {
    for (int s = 0; s < M; s += S) {
      project_rows<S, project_ranks(T)>(g + s, a.Q, static_cast<const acc_t*>(nullptr), d, r,
                                        gz + s);
    }
    if (act.v) {
      for (int i = 0; i < M; ++i) {
        activated_coef(act.act, act.v + row_at(a.order, n + i) * rp, gz[i], r, rp, coef[i]);
      }
    }
  }
  if (a.grad_h) {
    scalar_t* dh[M];
    for (int i = 0; i < M; ++i) dh[i] = a.grad_h + row_at(a.order, n + i) * d;
    for (int s = 0; s < M; s += S) {
      RowsAhead<S, scalar_t> part;  // the rows ahead that this edit prefetches
      for (int i = 0; ahead && i < S; ++i) {
        part.in[i] = ahead->in[s + i];
        part.out[i] = ahead->out[s + i];
      }
      edit_rows<S, T>(g + s, coef + s, a.P, d, rp, dh + s, ahead ? &part : nullptr);
    }
  }
  if (a.want_P) {
    scratch.template view<M>(a.h, a.order, n, d, 1, x);
    accumulate_rows<M>(partial, coef, x, d, rp);
  }
  if (a.want_Q) accumulate_rows<M>(partial + rp * d, zi, g, d, r);
  if (a.want_b) {
    acc_t* db = partial + (rp + r) * d;
    for (int64_t k = 0; k < rp; ++k) {
      for (int i = 0; i < M; ++i) db[k] += coef[i][k];
    }
  }
}

// Backward on the rows at positions [begin, end) into `partial`; T as in forward_rows.
template <typename scalar_t, int T = kEditStrips, typename acc_t = acc_type<scalar_t>>
REFT_ROW_INLINE void backward_rows(const BackwardArgs<scalar_t>& a, acc_t* partial, int64_t begin,
                                   int64_t end) {
  // Per row of a block: gz (r values) and, activated, ∂v (rp values).
  const int64_t per_row = a.activated.v ? a.r + a.rp() : a.r;
  RowScratch<scalar_t, acc_t> scratch(2 * kBackwardRowBlock, kBackwardRowBlock, a.d, per_row);
  int64_t n = begin;
  // The rows of ∂out and ∂h ahead are prefetched during the ∂h edit where there
  // is one (4–15 % faster than all at once, fp32 r 4, N 8192); h's rows, and ∂out's when ∂h is
  // not wanted, all at once before the block.
  RowsAhead<kBackwardRowBlock, scalar_t> ahead;
  for (; n + kBackwardRowBlock <= end; n += kBackwardRowBlock) {
    const int64_t later = n + kPrefetchBlocks * kBackwardRowBlock;
    bool spread = false;
    if (a.grad_h) {
      spread = point_rows_ahead(ahead, a.grad_out, a.grad_h, a.order, later, end, a.d);
    } else {
      prefetch_rows<kBackwardRowBlock>(a.grad_out, a.order, later, end, a.d);
    }
    if (a.want_P) prefetch_rows<kBackwardRowBlock>(a.h, a.order, later, end, a.d);
    backward_block<kBackwardRowBlock, T>(scratch, a, partial, n, spread ? &ahead : nullptr);
  }
  for (; n < end; ++n) {
    backward_block<1, T>(scratch, a, partial, n,
                         static_cast<const RowsAhead<1, scalar_t>*>(nullptr));
  }
}

// Second stage of the parameter gradients: for each adapter a, part t of its gradient (0: ∂P,
// rp×d; 1: ∂Q, r×d; 2: ∂b, rp) is the sum of its groups' partials [first_group[a],
// first_group[a+1]), added in group order, so the result does not depend on the thread count; an
// adapter with no groups gets zeros. targets[t] holds part t of every adapter in turn, or is null
// (not wanted). partials: one row of partial_size(rp, r, d) per group.
template <typename acc_t>
void sum_partials(const acc_t* partials, const int64_t* first_group, int64_t adapters, int64_t rp,
                  int64_t r, int64_t d, const std::array<acc_t*, 3>& targets) {
  const int64_t size = partial_size(rp, r, d);
  const int64_t starts[3] = {0, rp * d, (rp + r) * d}, sizes[3] = {rp * d, r * d, rp};
  at::parallel_for(0, adapters * size, 4096, [&](int64_t begin, int64_t end) {
    // Runs of consecutive elements of one part of one adapter, each run's elements side by side
    // in every partial and in the target: the loops over them vectorize (an index division per
    // element did not, and cost an eighth of the backward at N 256, r 16).
    // A run is at most kRun elements, so its target stays in L1 while the groups are added.
    constexpr int64_t kRun = 1024;
    for (int64_t idx = begin; idx < end;) {
      const int64_t a = idx / size, i = idx % size;
      const int part = i < starts[1] ? 0 : (i < starts[2] ? 1 : 2);
      const int64_t run = std::min({kRun, end - idx, starts[part] + sizes[part] - i});
      acc_t* target = targets[part];
      idx += run;
      if (target == nullptr) continue;
      target += a * sizes[part] + i - starts[part];
      for (int64_t e = 0; e < run; ++e) target[e] = acc_t(0);
      for (int64_t g = first_group[a]; g < first_group[a + 1]; ++g) {
        const acc_t* partial = partials + g * size + i;
        for (int64_t e = 0; e < run; ++e) target[e] += partial[e];
      }
    }
  });
}

}  // namespace cpu
}  // namespace reft_ext
