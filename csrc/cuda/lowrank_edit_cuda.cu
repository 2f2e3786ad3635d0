// CUDA implementation of the low-rank edit ops.
//
// Forward: one launch of edit_rows_kernel (read h once, write out once, z to an N×r buffer).
// Backward: edit_rows_kernel again with the factors swapped (gz = g Qᵀ, ∂h = g + gz P), then
// outer_partials_kernel (∂P = gzᵀ h, ∂Q = zᵀ g, ∂b = Σ gz per group of rows) and
// sum_partials_kernel (groups added in order). No atomics, deterministic. Passes over N×d: the
// first kernel reads g twice and writes ∂h; the second reads h for ∂P and g for ∂Q. A gradient not
// asked for skips its part: without ∂h the first kernel reads g once and writes nothing of N×d.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

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

// For a tile of kTileRows rows x: proj = x Aᵀ (+ c) (N, r) and y = x + proj B.
// Forward: (A, B, c) = (P, Q, b). Backward: (A, B, c) = (Q, P, null) gives gz and ∂h; with y null
// only proj is computed. V divides d (V = 1 otherwise), so every strip is full.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads, edit_rows_min_blocks<acc_t>())
    edit_rows_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ A,
                     const acc_t* __restrict__ B, const acc_t* __restrict__ c,
                     scalar_t* __restrict__ y, acc_t* proj, int64_t N, int64_t d, int r) {
  __shared__ acc_t warp_partials[kWarps][kTileRows * kChunk];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int rows = static_cast<int>(N - row0 < kTileRows ? N - row0 : kTileRows);
  const int64_t strips = d / V;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  for (int k0 = 0; k0 < r; k0 += kChunk) {
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
        acc_t xv[V];
        load_vec<V>(xv, x + (row0 + i) * d + j);
#pragma unroll
        for (int kk = 0; kk < kChunk; ++kk) {
          if (k0 + kk >= r) break;
          acc_t lanes[V] = {};
          dot_lanes<V>(lanes, xv, A + (k0 + kk) * d + j);
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
      if (i < rows && k < r) {
        acc_t total = c ? c[k] : acc_t(0);
        for (int w = 0; w < kWarps; ++w) total += warp_partials[w][threadIdx.x];
        proj[(row0 + i) * r + k] = total;
      }
    }
    __syncthreads();  // also publishes this chunk of proj to the whole block
  }
  if (y == nullptr) return;  // the same for the whole block: no barrier is left behind

  for (int64_t s = threadIdx.x; s < strips; s += kThreads) {
    const int64_t j = s * V;
    for (int i = 0; i < rows; ++i) {
      acc_t xv[V];
      load_vec<V>(xv, x + (row0 + i) * d + j);
      const acc_t* p = proj + (row0 + i) * r;
      for (int k = 0; k < r; ++k) axpy_lanes<V>(xv, p[k], B + k * d + j);
      store_vec<V>(y + (row0 + i) * d + j, xv);
    }
  }
}

// Per group of rows (blockIdx.y) and column strip: partials[t][group][k][j] = Σ_n coef[n][k]
// x[n][j] with (coef, x) = (gz, h) for t = 0 (∂P) and (z, g) for t = 1 (∂Q); t = first_t +
// blockIdx.z, so a grid of depth 1 computes only one of them. Unless bias_partials is null, block
// (0, group, 0) also writes bias_partials[group][k] = Σ_n gz[n][k].
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    outer_partials_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ g,
                          const acc_t* __restrict__ gz, const acc_t* __restrict__ z,
                          acc_t* __restrict__ partials, acc_t* __restrict__ bias_partials,
                          int64_t N, int64_t d, int r, int64_t group_rows, int first_t) {
  const int t = first_t + static_cast<int>(blockIdx.z);
  const scalar_t* x = t == 0 ? h : g;
  const acc_t* coef = t == 0 ? gz : z;
  const int64_t group = blockIdx.y, groups = gridDim.y;
  const int64_t n0 = group * group_rows;
  const int64_t n1 = n0 + group_rows < N ? n0 + group_rows : N;
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V;

  if (bias_partials != nullptr && blockIdx.z == 0 && blockIdx.x == 0) {
    for (int k = threadIdx.x; k < r; k += kThreads) {
      acc_t total = 0;
      for (int64_t n = n0; n < n1; ++n) total += gz[n * r + k];
      bias_partials[group * r + k] = total;
    }
  }
  if (j >= d) return;
  for (int k0 = 0; k0 < r; k0 += kChunk) {
    acc_t acc[kChunk][V];
#pragma unroll
    for (int kk = 0; kk < kChunk; ++kk)
#pragma unroll
      for (int v = 0; v < V; ++v) acc[kk][v] = 0;
    for (int64_t n = n0; n < n1; ++n) {
      acc_t xv[V];
      load_strip<V>(xv, x + n * d + j);
#pragma unroll
      for (int kk = 0; kk < kChunk; ++kk) {
        if (k0 + kk < r) axpy_lanes<V>(acc[kk], coef[n * r + k0 + kk], xv);
      }
    }
#pragma unroll
    for (int kk = 0; kk < kChunk; ++kk) {
      if (k0 + kk < r) {
        acc_t* dst = partials + ((t * groups + group) * r + k0 + kk) * d + j;
#pragma unroll
        for (int v = 0; v < V; ++v) dst[v] = acc[kk][v];
      }
    }
  }
}

// grad_P, grad_Q (r×d each) and grad_b (r): partials added in group order; a null target is
// skipped.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const acc_t* __restrict__ partials, const acc_t* __restrict__ bias_partials,
                        acc_t* __restrict__ grad_P, acc_t* __restrict__ grad_Q,
                        acc_t* __restrict__ grad_b, int64_t groups, int64_t rd, int r) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx < 2 * rd) {
    const int64_t t = idx / rd, e = idx % rd;
    acc_t* target = t == 0 ? grad_P : grad_Q;
    if (target == nullptr) return;
    acc_t total = 0;
    for (int64_t group = 0; group < groups; ++group)
      total += partials[(t * groups + group) * rd + e];
    target[e] = total;
  } else if (idx < 2 * rd + r && grad_b != nullptr) {
    const int64_t k = idx - 2 * rd;
    acc_t total = 0;
    for (int64_t group = 0; group < groups; ++group) total += bias_partials[group * r + k];
    grad_b[k] = total;
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

template <typename scalar_t, typename acc_t>
void launch_edit_rows(const scalar_t* x, const acc_t* A, const acc_t* B, const acc_t* c,
                      scalar_t* y, acc_t* proj, int64_t N, int64_t d, int r, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kTileRows)));
  if (can_vectorize<scalar_t>(d, {x, y})) {
    edit_rows_kernel<scalar_t, acc_t, 16 / sizeof(scalar_t)>
        <<<grid, kThreads, 0, stream>>>(x, A, B, c, y, proj, N, d, r);
  } else {
    edit_rows_kernel<scalar_t, acc_t, 1>
        <<<grid, kThreads, 0, stream>>>(x, A, B, c, y, proj, N, d, r);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> lowrank_edit_forward_cuda(const at::Tensor& h,
                                                             const at::Tensor& P,
                                                             const at::Tensor& Q,
                                                             const at::Tensor& b) {
  check_forward_args(h, P, Q, b);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t N = h.size(0), d = h.size(1), r = P.size(0);
  auto out = at::empty_like(h);
  auto z = at::empty({N, r}, P.options());
  if (N == 0) return {out, z};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  REFT_DISPATCH_SUPPORTED(h.scalar_type(), "lowrank_edit_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    launch_edit_rows<scalar_t, acc_t>(h.const_data_ptr<scalar_t>(), P.const_data_ptr<acc_t>(),
                                      Q.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                                      out.mutable_data_ptr<scalar_t>(), z.mutable_data_ptr<acc_t>(),
                                      N, d, static_cast<int>(r), stream);
  });
  return {out, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_edit_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
    const at::Tensor& z, std::array<bool, 4> output_mask) {
  check_backward_args(grad_out, h, P, Q, z);
  const c10::cuda::CUDAGuard guard(h.device());
  BackwardOutputs grads(h, P, output_mask);
  const int64_t N = h.size(0), d = h.size(1), r = P.size(0);
  // No products to sum (and no empty grid), or nothing asked for.
  if (N == 0 || d == 0 || !grads.any()) return grads.zero_filled();
  // gz is needed by ∂h, ∂P and ∂b; ∂Q needs only z and g.
  const bool want_gz = grads.want_h() || grads.want_P() || grads.want_b();
  const bool want_outer = grads.want_P() || grads.want_Q();
  auto gz = at::empty({want_gz ? N : 0, r}, P.options());
  const int64_t group_rows = rows_per_partial(N, r);
  const int64_t groups = ceil_div(N, group_rows);
  auto partials = at::empty({want_outer ? 2 : 0, groups, r, d}, P.options());
  auto bias_partials = at::empty({grads.want_b() ? groups : 0, r}, P.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  REFT_DISPATCH_SUPPORTED(h.scalar_type(), "lowrank_edit_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* g_ptr = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* h_ptr = h.const_data_ptr<scalar_t>();
    acc_t* gz_ptr = want_gz ? gz.mutable_data_ptr<acc_t>() : nullptr;
    if (want_gz) {
      launch_edit_rows<scalar_t, acc_t>(
          g_ptr, Q.const_data_ptr<acc_t>(), P.const_data_ptr<acc_t>(), nullptr,
          grads.want_h() ? grads.grad_h.mutable_data_ptr<scalar_t>() : nullptr, gz_ptr, N, d,
          static_cast<int>(r), stream);
    }
    if (want_outer || grads.want_b()) {
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
      if (strips > 0) {
        outer_partials_kernel<scalar_t, acc_t, V><<<grid, kThreads, 0, stream>>>(
            h_ptr, g_ptr, gz_ptr, z.const_data_ptr<acc_t>(), partials_ptr, bias_ptr, N, columns,
            static_cast<int>(r), group_rows, first_t);
      } else {
        outer_partials_kernel<scalar_t, acc_t, 1><<<grid, kThreads, 0, stream>>>(
            h_ptr, g_ptr, gz_ptr, z.const_data_ptr<acc_t>(), partials_ptr, bias_ptr, N, columns,
            static_cast<int>(r), group_rows, first_t);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t outputs = 2 * r * d + r;
      sum_partials_kernel<acc_t>
          <<<static_cast<unsigned>(ceil_div(outputs, kThreads)), kThreads, 0, stream>>>(
              partials_ptr, bias_partials.const_data_ptr<acc_t>(),
              grads.want_P() ? grads.grad_P.mutable_data_ptr<acc_t>() : nullptr,
              grads.want_Q() ? grads.grad_Q.mutable_data_ptr<acc_t>() : nullptr,
              grads.want_b() ? grads.grad_b.mutable_data_ptr<acc_t>() : nullptr, groups, r * d,
              static_cast<int>(r));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grads.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(reft_ext, CUDA, m) {
  m.impl("lowrank_edit_forward", &lowrank_edit_forward_cuda);
  m.impl("lowrank_edit_backward", &lowrank_edit_backward_cuda);
}

}  // namespace reft_ext
