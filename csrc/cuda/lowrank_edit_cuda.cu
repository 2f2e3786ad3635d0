// CUDA implementation of the low-rank edit ops, single-adapter and multi-adapter.
//
// Forward: one launch of edit_rows_kernel (read h once, write out once, z to an N×r buffer).
// Backward: edit_rows_kernel again with the factors swapped (gz = g Qᵀ, ∂h = g + gz P), then
// outer_partials_kernel (∂P = gzᵀ h, ∂Q = zᵀ g, ∂b = Σ gz per group of rows) and
// sum_partials_kernel (groups added in order). No atomics, deterministic. Passes over N×d: the
// first kernel reads g twice and writes ∂h; the second reads h for ∂P and g for ∂Q. A gradient not
// asked for skips its part: without ∂h the first kernel reads g once and writes nothing of N×d.
//
// Activated edit (lowrank_edit_act: z = act(u) − s from v = h Pᵀ + b, P with rp = r or 2r rows):
// the same kernels, edit_rows_kernel mapping each row's projections through csrc/activation.h
// between its two phases (forward: v -> z; backward: gz -> ∂v), the parameter sums taking ∂v's rp
// rows for ∂P and ∂b.
//
// Multi-adapter ops (row i edited by adapter[i]'s factors, -1 copies the row): the same kernels
// with kIndexed. edit_rows_kernel reads each row's adapter and its factors row by row (BGMV), so
// the forward needs no sort. For the parameter sums, backward sorts the rows by adapter (stable, on
// the device) and splits each adapter's rows into the groups rows_per_partial gives for its row
// count; a bound on the number of groups sizes the grid, so nothing waits for the host. With every
// row on one adapter the groups, the order of every sum and so the bits are those of the single op.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../activation.h"
#include "../lowrank_edit.h"
#include "../lowrank_edit_checks.h"
#include "../lowrank_edit_outputs.h"
#include "warp_reduce.cuh"

namespace reft_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 4;  // rows per block of edit_rows_kernel: each factor strip serves 4 rows
constexpr int kChunk = 8;     // projections reduced together (registers: kTileRows × kChunk)

// V consecutive elements, with one 16-byte load/store when V elements span exactly 16 bytes.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_vec(acc_t* out, const scalar_t* src) {
  if constexpr (V * sizeof(scalar_t) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const scalar_t* elements = reinterpret_cast<const scalar_t*>(&raw);
    load_strip<V>(out, elements);
  } else {
    load_strip<V>(out, src);
  }
}

template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_vec(scalar_t* dst, const acc_t* values) {
  if constexpr (V * sizeof(scalar_t) == 16) {
    uint4 raw;
    store_strip<V>(reinterpret_cast<scalar_t*>(&raw), values);
    *reinterpret_cast<uint4*>(dst) = raw;
  } else {
    store_strip<V>(dst, values);
  }
}

// Resident blocks per SM that edit_rows_kernel is compiled for: the register budget per thread is
// 65536 / (kThreads · blocks). Three (85 registers) holds the kTileRows × kChunk float accumulators
// and a 16-byte strip without spilling (ptxas chose 64 and spilled on sm_90); double needs two.
template <typename acc_t>
constexpr int edit_rows_min_blocks() {
  return sizeof(acc_t) == 8 ? 2 : 3;
}

// The activated edit's map between edit_rows_kernel's phases, per row: forward, coef = z =
// activated_z(proj = v); backward, coef = ∂v = activated_coef(v, proj = gz). coef null: the plain
// edit (the edit phase uses proj itself).
template <typename acc_t>
struct RowMap {
  acc_t* coef = nullptr;     // (N, B's rows)
  const acc_t* v = nullptr;  // backward: the forward's v (N, rp)
  int r = 0, rp = 0;         // rows of Q and of P
  Activation act = Activation::kIdentity;
};

// For a tile of kTileRows rows x: proj = x Aᵀ (+ c) (N, rA) and y = x + coef B (B with rB rows;
// coef = proj unless `map` says otherwise). Forward: (A, B, c) = (P, Q, b). Backward: (A, B, c) =
// (Q, P, null) gives gz and ∂h; with y null only proj (and map's coef) is computed. V divides d (V
// = 1 otherwise), so every strip is full. kIndexed (plain edit only, rA = rB = r): A, B (adapters,
// r, d) and c (adapters, r) hold every adapter's factors and row n uses adapter[n]'s; a row with
// adapter -1 gets proj = 0 and y = x.
template <typename scalar_t, typename acc_t, int V, bool kIndexed>
__global__ void __launch_bounds__(kThreads, edit_rows_min_blocks<acc_t>())
    edit_rows_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ A,
                     const acc_t* __restrict__ B, const acc_t* __restrict__ c,
                     scalar_t* __restrict__ y, acc_t* proj, int64_t N, int64_t d, int rA, int rB,
                     const int64_t* __restrict__ adapter, RowMap<acc_t> map) {
  __shared__ acc_t warp_partials[kWarps][kTileRows * kChunk];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int rows = static_cast<int>(N - row0 < kTileRows ? N - row0 : kTileRows);
  const int64_t strips = d / V;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // The adapter of tile row i (0 without an index).
  const auto adapter_of = [&](int i) -> int64_t {
    if constexpr (kIndexed) {
      return adapter[row0 + i];
    } else {
      return 0;
    }
  };

  for (int k0 = 0; k0 < rA; k0 += kChunk) {
    acc_t acc[kTileRows][kChunk];
#pragma unroll
    for (int i = 0; i < kTileRows; ++i)
#pragma unroll
      for (int kk = 0; kk < kChunk; ++kk) acc[i][kk] = 0;
    for (int64_t s = threadIdx.x; s < strips; s += kThreads) {
      const int64_t j = s * V;
#pragma unroll
      for (int i = 0; i < kTileRows; ++i) {
        if (i >= rows) break;
        const int64_t a = adapter_of(i);
        if (a < 0) continue;
        const acc_t* factor = A + a * rA * d;
        acc_t xv[V];
        load_vec<V>(xv, x + (row0 + i) * d + j);
#pragma unroll
        for (int kk = 0; kk < kChunk; ++kk) {
          if (k0 + kk >= rA) break;
          acc_t lanes[V] = {};
          dot_lanes<V>(lanes, xv, factor + (k0 + kk) * d + j);
          acc[i][kk] += sum_lanes<V>(lanes);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kTileRows; ++i)
#pragma unroll
      for (int kk = 0; kk < kChunk; ++kk) {
        const acc_t total = warp_sum(acc[i][kk]);
        if (lane == 0) warp_partials[warp][i * kChunk + kk] = total;
      }
    __syncthreads();
    if (threadIdx.x < kTileRows * kChunk) {
      const int i = threadIdx.x / kChunk, k = k0 + threadIdx.x % kChunk;
      if (i < rows && k < rA) {
        const int64_t a = adapter_of(i);
        acc_t total = c && a >= 0 ? c[a * rA + k] : acc_t(0);
        for (int w = 0; w < kWarps; ++w) total += warp_partials[w][threadIdx.x];
        proj[(row0 + i) * rA + k] = total;
      }
    }
    __syncthreads();  // also publishes this chunk of proj to the whole block
  }
  if (map.coef != nullptr) {  // one thread per row: r activations, next to the row's d-long work
    if (threadIdx.x < rows) {
      const int64_t row = row0 + threadIdx.x;
      if (map.v == nullptr) {
        activated_z(map.act, proj + row * rA, map.r, map.rp, map.coef + row * rB);
      } else {
        activated_coef(map.act, map.v + row * map.rp, proj + row * rA, map.r, map.rp,
                       map.coef + row * rB);
      }
    }
    __syncthreads();
  }
  if (y == nullptr) return;  // the same for the whole block: no barrier is left behind
  const acc_t* coef = map.coef != nullptr ? map.coef : proj;

  for (int64_t s = threadIdx.x; s < strips; s += kThreads) {
    const int64_t j = s * V;
    for (int i = 0; i < rows; ++i) {
      acc_t xv[V];
      load_vec<V>(xv, x + (row0 + i) * d + j);
      const int64_t a = adapter_of(i);
      if (a >= 0) {
        const acc_t* p = coef + (row0 + i) * rB;
        const acc_t* factor = B + a * rB * d;
        for (int k = 0; k < rB; ++k) axpy_lanes<V>(xv, p[k], factor + k * d + j);
      }
      store_vec<V>(y + (row0 + i) * d + j, xv);
    }
  }
}

// Rows grouped by adapter, for the indexed backward: order[segment[a] .. segment[a + 1]) are
// adapter a's rows in row order, and its partial-sum groups are first_group[a] .. first_group[a +
// 1), of rows_per_partial(its row count, r) rows each. All on the device.
struct AdapterGroups {
  const int64_t* order;
  const int64_t* segment;      // adapters + 1 entries
  const int64_t* first_group;  // adapters + 1 entries
  int64_t adapters;
};

// One block: segment[a] = the first position of the sorted keys holding a (a <= adapters; the
// unedited rows, key = adapters, start at segment[adapters]), then each adapter's groups numbered
// in adapter order (a serial scan over the adapters on thread 0: a few thousand additions at most).
__global__ void __launch_bounds__(kThreads)
    plan_groups_kernel(const int64_t* __restrict__ sorted_keys, int64_t N, int64_t adapters, int r,
                       int64_t* __restrict__ segment, int64_t* __restrict__ first_group) {
  for (int64_t a = threadIdx.x; a <= adapters; a += kThreads) {
    int64_t lo = 0, hi = N;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (sorted_keys[mid] < a) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    segment[a] = lo;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    first_group[0] = 0;
    for (int64_t a = 0; a < adapters; ++a) {
      const int64_t count = segment[a + 1] - segment[a];
      first_group[a + 1] = first_group[a] + ceil_div(count, rows_per_partial(count, r));
    }
  }
}

// Per group of rows (blockIdx.y) and column strip: partials[t][group][k][j] = Σ_n coef[n][k]
// x[n][j] with (coef, x) = (gz, h) for t = 0 (∂P; rp rows of coefficients: ∂v for the activated
// edit, else rp = r) and (z, g) for t = 1 (∂Q, r rows); t = first_t + blockIdx.z, so a grid of
// depth 1 computes only one of them. The partials are [t = 0: groups × rp × d | t = 1: groups × r
// × d]. Unless bias_partials is null, block (0, group, 0) also writes bias_partials[group][k] =
// Σ_n gz[n][k] (k < rp). Groups are runs of group_rows rows, or with kIndexed those of `groups` (a
// block past the last group has nothing to do).
// At least two resident blocks per SM (up to 128 registers): at ptxas's default budget for 256
// threads (64) the indexed variant's group search spilled.
template <typename scalar_t, typename acc_t, int V, bool kIndexed>
__global__ void __launch_bounds__(kThreads, 2)
    outer_partials_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ g,
                          const acc_t* __restrict__ gz, const acc_t* __restrict__ z,
                          acc_t* __restrict__ partials, acc_t* __restrict__ bias_partials,
                          int64_t N, int64_t d, int rp, int r, int64_t group_rows, int first_t,
                          AdapterGroups by_adapter) {
  const int t = first_t + static_cast<int>(blockIdx.z);
  const scalar_t* x = t == 0 ? h : g;
  const acc_t* coef = t == 0 ? gz : z;
  const int rows_t = t == 0 ? rp : r;
  const int64_t group = blockIdx.y, groups = gridDim.y;
  int64_t n0 = group * group_rows;
  int64_t n1 = n0 + group_rows < N ? n0 + group_rows : N;
  if constexpr (kIndexed) {
    const int64_t* first = by_adapter.first_group;
    if (group >= first[by_adapter.adapters]) return;  // the whole block: there is no barrier
    int64_t a = 0, past = by_adapter.adapters;        // first[a] <= group < first[past]
    while (past - a > 1) {
      const int64_t mid = (a + past) / 2;
      if (first[mid] <= group) {
        a = mid;
      } else {
        past = mid;
      }
    }
    const int64_t begin = by_adapter.segment[a], end = by_adapter.segment[a + 1];
    const int64_t rows_a = rows_per_partial(end - begin, r);
    n0 = begin + (group - first[a]) * rows_a;
    n1 = n0 + rows_a < end ? n0 + rows_a : end;
  }
  // The row at position n of the group's run.
  const auto row_at = [&](int64_t n) -> int64_t {
    if constexpr (kIndexed) {
      return by_adapter.order[n];
    } else {
      return n;
    }
  };
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V;

  if (bias_partials != nullptr && blockIdx.z == 0 && blockIdx.x == 0) {
    for (int k = threadIdx.x; k < rp; k += kThreads) {
      acc_t total = 0;
      for (int64_t n = n0; n < n1; ++n) total += gz[row_at(n) * rp + k];
      bias_partials[group * rp + k] = total;
    }
  }
  if (j >= d) return;
  acc_t* part = partials + (t == 0 ? 0 : groups * rp * d) + group * rows_t * d;
  for (int k0 = 0; k0 < rows_t; k0 += kChunk) {
    acc_t acc[kChunk][V];
#pragma unroll
    for (int kk = 0; kk < kChunk; ++kk)
#pragma unroll
      for (int v = 0; v < V; ++v) acc[kk][v] = 0;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t row = row_at(n);
      acc_t xv[V];
      load_strip<V>(xv, x + row * d + j);
#pragma unroll
      for (int kk = 0; kk < kChunk; ++kk) {
        if (k0 + kk < rows_t) axpy_lanes<V>(acc[kk], coef[row * rows_t + k0 + kk], xv);
      }
    }
#pragma unroll
    for (int kk = 0; kk < kChunk; ++kk) {
      if (k0 + kk < rows_t) {
        acc_t* dst = part + (k0 + kk) * d + j;
#pragma unroll
        for (int v = 0; v < V; ++v) dst[v] = acc[kk][v];
      }
    }
  }
}

// grad_P (rp×d), grad_Q (r×d) and grad_b (rp) of each adapter a < adapters (one without an
// index): the partials of its groups [first_group[a], first_group[a + 1]) — all `groups` without
// an index — added in group order; a null target is skipped. `groups` is also the partials' group
// stride (layout of outer_partials_kernel).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const acc_t* __restrict__ partials, const acc_t* __restrict__ bias_partials,
                        acc_t* __restrict__ grad_P, acc_t* __restrict__ grad_Q,
                        acc_t* __restrict__ grad_b, int64_t groups, int64_t d, int rp, int r,
                        const int64_t* __restrict__ first_group, int64_t adapters) {
  const int64_t size_P = rp * d, size_Q = r * d;
  const int64_t per_adapter = size_P + size_Q + rp;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= adapters * per_adapter) return;
  const int64_t a = idx / per_adapter, e = idx % per_adapter;
  const int64_t g0 = first_group ? first_group[a] : 0;
  const int64_t g1 = first_group ? first_group[a + 1] : groups;
  if (e < size_P + size_Q) {
    const bool is_P = e < size_P;
    acc_t* target = is_P ? grad_P : grad_Q;
    if (target == nullptr) return;
    const int64_t k = is_P ? e : e - size_P, size = is_P ? size_P : size_Q;
    const acc_t* first = partials + (is_P ? 0 : groups * size_P) + k;
    acc_t total = 0;
    for (int64_t group = g0; group < g1; ++group) total += first[group * size];
    target[a * size + k] = total;
  } else if (grad_b != nullptr) {
    const int64_t k = e - size_P - size_Q;
    acc_t total = 0;
    for (int64_t group = g0; group < g1; ++group) total += bias_partials[group * rp + k];
    grad_b[a * rp + k] = total;
  }
}

// Whether rows of width d at these pointers stay 16-byte aligned, so that strips of 16 / sizeof
// (scalar_t) elements can be loaded and stored as one 16-byte vector.
template <typename scalar_t>
bool can_vectorize(int64_t d, std::initializer_list<const void*> pointers) {
  constexpr int64_t V = 16 / sizeof(scalar_t);
  if (d % V != 0) return false;
  for (const void* p : pointers) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// edit_rows_kernel over all N rows; with `adapter` (N,) each row uses its adapter's factors.
template <typename scalar_t, typename acc_t>
void launch_edit_rows(const scalar_t* x, const acc_t* A, const acc_t* B, const acc_t* c,
                      scalar_t* y, acc_t* proj, int64_t N, int64_t d, int rA, int rB,
                      const int64_t* adapter, RowMap<acc_t> map, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kTileRows)));
  constexpr int V = 16 / sizeof(scalar_t);
  const bool vectorize = can_vectorize<scalar_t>(d, {x, y});
  if (adapter == nullptr && vectorize) {
    edit_rows_kernel<scalar_t, acc_t, V, false>
        <<<grid, kThreads, 0, stream>>>(x, A, B, c, y, proj, N, d, rA, rB, adapter, map);
  } else if (adapter == nullptr) {
    edit_rows_kernel<scalar_t, acc_t, 1, false>
        <<<grid, kThreads, 0, stream>>>(x, A, B, c, y, proj, N, d, rA, rB, adapter, map);
  } else if (vectorize) {
    edit_rows_kernel<scalar_t, acc_t, V, true>
        <<<grid, kThreads, 0, stream>>>(x, A, B, c, y, proj, N, d, rA, rB, adapter, map);
  } else {
    edit_rows_kernel<scalar_t, acc_t, 1, true>
        <<<grid, kThreads, 0, stream>>>(x, A, B, c, y, proj, N, d, rA, rB, adapter, map);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The adapter index of a multi-adapter call as int64, its values checked to lie in [-1, adapters)
// by a device-side assert: no host synchronization.
at::Tensor checked_index(const at::Tensor& adapter, int64_t adapters) {
  at::Tensor index = adapter.to(at::kLong).contiguous();
  at::_assert_async(index.ge(-1).logical_and(index.lt(adapters)).all(),
                    "lowrank_edit_multi: adapter holds an index outside [-1, A), A = P.size(0)");
  return index;
}

// Forward of the single edit (index undefined; P, Q (r, d)), of the multi-adapter edit (index
// (N,) int64; P, Q (A, r, d), b (A, r)) and of the activated edit (v defined: P (rp, d), b (rp,),
// v (N, rp) written beside z). Returns (out, z).
std::tuple<at::Tensor, at::Tensor> edit_forward(const at::Tensor& h, const at::Tensor& P,
                                                const at::Tensor& Q, const at::Tensor& b,
                                                const at::Tensor& index, const at::Tensor& v = {},
                                                Activation act = Activation::kIdentity) {
  const int64_t N = h.size(0), d = h.size(1), r = Q.size(-2), rp = P.size(-2);
  auto out = at::empty_like(h);
  auto z = at::empty({N, r}, P.options());
  if (N == 0) return {out, z};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  REFT_DISPATCH_SUPPORTED(h.scalar_type(), "lowrank_edit_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    acc_t* z_ptr = z.mutable_data_ptr<acc_t>();
    RowMap<acc_t> map;  // the activated edit: projections into v, then z = act(u) − s
    if (v.defined()) map = {z_ptr, nullptr, static_cast<int>(r), static_cast<int>(rp), act};
    launch_edit_rows<scalar_t, acc_t>(
        h.const_data_ptr<scalar_t>(), P.const_data_ptr<acc_t>(), Q.const_data_ptr<acc_t>(),
        b.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
        v.defined() ? v.mutable_data_ptr<acc_t>() : z_ptr, N, d, static_cast<int>(rp),
        static_cast<int>(r), index.defined() ? index.const_data_ptr<int64_t>() : nullptr, map,
        stream);
  });
  return {out, z};
}

// outer_partials_kernel with V elements per thread, indexed or not (the grid's column blocks
// sized by the caller for that V).
template <typename scalar_t, typename acc_t, int V>
void launch_outer_partials(dim3 grid, cudaStream_t stream, bool indexed, const scalar_t* h,
                           const scalar_t* g, const acc_t* coef, const acc_t* z, acc_t* partials,
                           acc_t* bias_partials, int64_t N, int64_t columns, int rp, int r,
                           int64_t group_rows, int first_t, AdapterGroups by_adapter) {
  if (indexed) {
    outer_partials_kernel<scalar_t, acc_t, V, true><<<grid, kThreads, 0, stream>>>(
        h, g, coef, z, partials, bias_partials, N, columns, rp, r, group_rows, first_t, by_adapter);
  } else {
    outer_partials_kernel<scalar_t, acc_t, V, false><<<grid, kThreads, 0, stream>>>(
        h, g, coef, z, partials, bias_partials, N, columns, rp, r, group_rows, first_t, by_adapter);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Backward of either edit (index, v and act as in edit_forward).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> edit_backward(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
    const at::Tensor& z, const at::Tensor& index, std::array<bool, 4> output_mask,
    const at::Tensor& v = {}, Activation act = Activation::kIdentity) {
  BackwardOutputs grads(h, P, Q, output_mask);
  const bool indexed = index.defined();
  const int64_t N = h.size(0), d = h.size(1), r = Q.size(-2), rp = P.size(-2);
  const int64_t adapters = indexed ? P.size(0) : 1;
  // No products to sum (and no empty grid), or nothing asked for.
  if (N == 0 || d == 0 || !grads.any()) return grads.zero_filled();
  // gz is needed by ∂h, ∂P and ∂b; ∂Q needs only z and g.
  const bool want_gz = grads.want_h() || grads.want_P() || grads.want_b();
  const bool want_outer = grads.want_P() || grads.want_Q();
  const bool want_sums = want_outer || grads.want_b();
  const int64_t* index_ptr = indexed ? index.const_data_ptr<int64_t>() : nullptr;
  auto gz = at::empty({want_gz ? N : 0, r}, P.options());
  // The activated edit's ∂v = activated_coef(v, gz): what ∂h, ∂P and ∂b take in gz's place.
  auto coef = at::empty({want_gz && v.defined() ? N : 0, rp}, P.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Groups of rows for the parameter sums: runs of group_rows rows, or with an index each
  // adapter's rows in groups planned on the device (by_adapter), `groups` then being a bound:
  // every group but an adapter's last has at least rows_per_partial(0, r) rows, and no adapter
  // has more than 256 groups.
  int64_t group_rows = rows_per_partial(N, rp);
  int64_t groups = ceil_div(N, group_rows);
  AdapterGroups by_adapter{nullptr, nullptr, nullptr, adapters};
  at::Tensor order, plan;
  if (indexed && want_sums) {
    // Rows sorted by adapter (stable: row order within an adapter), the unedited rows last.
    auto sorted = at::sort(index.masked_fill(index.lt(0), adapters), /*stable=*/true, 0, false);
    order = std::get<1>(sorted);
    plan = at::empty({2 * (adapters + 1)}, index.options());
    int64_t* plan_ptr = plan.mutable_data_ptr<int64_t>();
    plan_groups_kernel<<<1, kThreads, 0, stream>>>(std::get<0>(sorted).const_data_ptr<int64_t>(), N,
                                                   adapters, static_cast<int>(r), plan_ptr,
                                                   plan_ptr + adapters + 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    by_adapter = {order.const_data_ptr<int64_t>(), plan_ptr, plan_ptr + adapters + 1, adapters};
    groups = std::min(ceil_div(N, rows_per_partial(0, r)) + adapters, 256 * adapters);
    TORCH_CHECK(groups <= 65535, "lowrank_edit_multi: too many rows and adapters for one call (", N,
                " rows, ", adapters, " adapters: ", groups, " partial-sum groups > 65535)");
  }
  auto partials = at::empty({want_outer ? groups * (rp + r) * d : 0}, P.options());
  auto bias_partials = at::empty({grads.want_b() ? groups : 0, rp}, P.options());
  REFT_DISPATCH_SUPPORTED(h.scalar_type(), "lowrank_edit_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* g_ptr = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* h_ptr = h.const_data_ptr<scalar_t>();
    acc_t* gz_ptr = want_gz ? gz.mutable_data_ptr<acc_t>() : nullptr;
    RowMap<acc_t> map;
    if (want_gz && v.defined()) {
      map = {coef.mutable_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(), static_cast<int>(r),
             static_cast<int>(rp), act};
    }
    if (want_gz) {
      launch_edit_rows<scalar_t, acc_t>(
          g_ptr, Q.const_data_ptr<acc_t>(), P.const_data_ptr<acc_t>(), nullptr,
          grads.want_h() ? grads.grad_h.mutable_data_ptr<scalar_t>() : nullptr, gz_ptr, N, d,
          static_cast<int>(r), static_cast<int>(rp), index_ptr, map, stream);
    }
    if (want_sums) {
      // Two-byte rows use 4-byte loads (2 elements), so a warp still reads 128 contiguous
      // bytes while the grid keeps enough column blocks to fill the GPU. Depth: the wanted
      // ones of ∂P (t = 0) and ∂Q (t = 1); ∂b alone needs one layer of column blocks.
      constexpr int V = sizeof(scalar_t) == 2 ? 2 : 1;
      const int64_t strips = d % V == 0 ? d / V : -1;
      const int first_t = grads.want_P() || !want_outer ? 0 : 1;
      const int depth = grads.want_P() && grads.want_Q() ? 2 : 1;
      const dim3 grid(
          static_cast<unsigned>(want_outer ? ceil_div(strips > 0 ? strips : d, kThreads) : 1),
          static_cast<unsigned>(groups), static_cast<unsigned>(depth));
      // With no outer product wanted, the kernel's column range starts past d (bias only).
      const int64_t columns = want_outer ? d : 0;
      acc_t* partials_ptr = want_outer ? partials.mutable_data_ptr<acc_t>() : nullptr;
      acc_t* bias_ptr = grads.want_b() ? bias_partials.mutable_data_ptr<acc_t>() : nullptr;
      const acc_t* coef_ptr = map.coef != nullptr ? map.coef : gz_ptr;
      const acc_t* z_ptr = z.const_data_ptr<acc_t>();
      const int rp_int = static_cast<int>(rp), r_int = static_cast<int>(r);
      if (strips > 0) {
        launch_outer_partials<scalar_t, acc_t, V>(grid, stream, indexed, h_ptr, g_ptr, coef_ptr,
                                                  z_ptr, partials_ptr, bias_ptr, N, columns, rp_int,
                                                  r_int, group_rows, first_t, by_adapter);
      } else {
        launch_outer_partials<scalar_t, acc_t, 1>(grid, stream, indexed, h_ptr, g_ptr, coef_ptr,
                                                  z_ptr, partials_ptr, bias_ptr, N, columns, rp_int,
                                                  r_int, group_rows, first_t, by_adapter);
      }
      const int64_t outputs = adapters * ((rp + r) * d + rp);
      sum_partials_kernel<acc_t>
          <<<static_cast<unsigned>(ceil_div(outputs, kThreads)), kThreads, 0, stream>>>(
              partials_ptr, bias_partials.const_data_ptr<acc_t>(),
              grads.want_P() ? grads.grad_P.mutable_data_ptr<acc_t>() : nullptr,
              grads.want_Q() ? grads.grad_Q.mutable_data_ptr<acc_t>() : nullptr,
              grads.want_b() ? grads.grad_b.mutable_data_ptr<acc_t>() : nullptr, groups, d, rp_int,
              r_int, by_adapter.first_group, adapters);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grads.as_tuple();
}

std::tuple<at::Tensor, at::Tensor> lowrank_edit_forward_cuda(const at::Tensor& h,
                                                             const at::Tensor& P,
                                                             const at::Tensor& Q,
                                                             const at::Tensor& b) {
  check_forward_args(h, P, Q, b);
  const c10::cuda::CUDAGuard guard(h.device());
  return edit_forward(h, P, Q, b, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_edit_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
    const at::Tensor& z, std::array<bool, 4> output_mask) {
  check_backward_args(grad_out, h, P, Q, z);
  const c10::cuda::CUDAGuard guard(h.device());
  return edit_backward(grad_out, h, P, Q, z, at::Tensor(), output_mask);
}

std::tuple<at::Tensor, at::Tensor> lowrank_edit_multi_forward_cuda(const at::Tensor& h,
                                                                   const at::Tensor& P,
                                                                   const at::Tensor& Q,
                                                                   const at::Tensor& b,
                                                                   const at::Tensor& adapter) {
  check_multi_forward_args(h, P, Q, b, adapter);
  const c10::cuda::CUDAGuard guard(h.device());
  return edit_forward(h, P, Q, b, checked_index(adapter, P.size(0)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_edit_multi_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
    const at::Tensor& z, const at::Tensor& adapter, std::array<bool, 4> output_mask) {
  check_multi_backward_args(grad_out, h, P, Q, z, adapter);
  const c10::cuda::CUDAGuard guard(h.device());
  return edit_backward(grad_out, h, P, Q, z, checked_index(adapter, P.size(0)), output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_edit_act_forward_cuda(
    const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q, const at::Tensor& b,
    c10::string_view activation) {
  check_act_forward_args(h, P, Q, b);
  const Activation act = parse_activation(activation);
  const c10::cuda::CUDAGuard guard(h.device());
  auto v = at::empty({h.size(0), P.size(0)}, P.options());
  auto [out, z] = edit_forward(h, P, Q, b, at::Tensor(), v, act);
  return {out, v, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_edit_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
    const at::Tensor& v, const at::Tensor& z, c10::string_view activation,
    std::array<bool, 4> output_mask) {
  check_act_backward_args(grad_out, h, P, Q, v, z);
  const Activation act = parse_activation(activation);
  const c10::cuda::CUDAGuard guard(h.device());
  return edit_backward(grad_out, h, P, Q, z, at::Tensor(), output_mask, v, act);
}

}  // namespace

TORCH_LIBRARY_IMPL(reft_ext, CUDA, m) {
  m.impl("lowrank_edit_act_forward", &lowrank_edit_act_forward_cuda);
  m.impl("lowrank_edit_act_backward", &lowrank_edit_act_backward_cuda);
  m.impl("lowrank_edit_forward", &lowrank_edit_forward_cuda);
  m.impl("lowrank_edit_backward", &lowrank_edit_backward_cuda);
  m.impl("lowrank_edit_multi_forward", &lowrank_edit_multi_forward_cuda);
  m.impl("lowrank_edit_multi_backward", &lowrank_edit_multi_backward_cuda);
}

}  // namespace reft_ext
