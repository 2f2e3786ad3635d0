// CUDA implementation of the retraction ops: one block per matrix, one launch for a batch
// (retract_) or for every matrix of a list of tensors (retract_list_, through a device table of
// the matrices), each block running the control flow of csrc/retraction.h that the CPU back-end
// runs. The d-long passes (Gram matrix, triangular solve, polar apply) are split over the block's
// threads, the r×r factorizations too (retraction_parallel.cuh); the rare Householder fallback
// runs on thread 0.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../retraction.h"
#include "../retraction_checks.h"
#include "retraction_parallel.cuh"
#include "warp_reduce.cuh"

namespace reft_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// S = R Rᵀ: one warp per (i, j) pair, lanes striding over d (coalesced), butterfly sum.
template <typename acc_t>
__device__ void block_gram(const acc_t* R, acc_t* S, int64_t r, int64_t d) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t pairs = r * (r + 1) / 2;
  for (int64_t p = warp; p < pairs; p += kWarps) {
    // p -> (i, j) with j <= i, row-major over the lower triangle.
    int64_t i = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(p) + 1.0) - 1.0) / 2.0);
    while (i * (i + 1) / 2 > p) --i;
    while ((i + 1) * (i + 2) / 2 <= p) ++i;
    const int64_t j = p - i * (i + 1) / 2;
    acc_t value = 0;
    for (int64_t c = lane; c < d; c += 32) value += R[i * d + c] * R[j * d + c];
    value = warp_sum(value);
    if (lane == 0) {
      S[i * r + j] = value;
      S[j * r + i] = value;
    }
  }
}

// max |x[e]| over n values (NaN if one is NaN), returned to every thread of the block.
template <typename acc_t>
__device__ acc_t block_max_abs(const acc_t* x, int64_t n) {
  __shared__ acc_t warp_max[kWarps];
  acc_t value = retraction::max_abs_strided(x, n, threadIdx.x, kThreads);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value = retraction::max_or_nan(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = value;
  __syncthreads();
  value = 0;
  for (int w = 0; w < kWarps; ++w) value = retraction::max_or_nan(value, warp_max[w]);
  return value;
}

// retraction::retract_matrix's team on CUDA: the block. The d-long passes are split over the
// threads (coalesced: neighbouring threads take neighbouring columns), the r×r factorizations
// spread over the block by retraction_parallel.cuh; thread 0 leads the Householder fallback.
struct BlockTeam {
  __device__ bool leader() const { return threadIdx.x == 0; }
  __device__ void sync() const { __syncthreads(); }
  __device__ int64_t first() const { return threadIdx.x; }
  __device__ int64_t stride() const { return kThreads; }
  template <typename acc_t>
  __device__ acc_t max_abs(const acc_t* x, int64_t n) const {
    return block_max_abs(x, n);
  }
  template <typename acc_t>
  __device__ void gram(const acc_t* R, acc_t* S, int64_t r, int64_t d) const {
    block_gram(R, S, r, d);
  }
  template <typename acc_t>
  __device__ void solve_lower(const acc_t* L, acc_t* R, int64_t r, int64_t d) const {
    retraction::solve_lower_columns<kThreads>(L, R, r, d, threadIdx.x, d);
  }
  template <typename acc_t>
  __device__ void apply_left(const acc_t* X, acc_t* R, acc_t* work, int64_t r, int64_t d) const {
    retraction::apply_left_columns<kThreads>(X, R, work, r, d, threadIdx.x);
    __syncthreads();
    for (int64_t e = threadIdx.x; e < r * d; e += kThreads) R[e] = work[e];
  }
  template <typename acc_t>
  __device__ bool cholesky(acc_t* S, int64_t r, acc_t min_ratio) const {
    return retraction::block_cholesky_lower<kThreads>(S, r, min_ratio);
  }
  template <typename acc_t>
  __device__ void multiply_into(acc_t* T, const acc_t* F, acc_t* tmp, int64_t r) const {
    retraction::block_multiply_into<kThreads>(T, F, tmp, r);
  }
  template <typename acc_t>
  __device__ bool polar(acc_t* X, acc_t* work, int64_t r) const {
    return retraction::block_polar<kThreads>(X, work, r);
  }
};

// One matrix of a launch: its r×d values (acc_t, retracted in place) and its scratch (r×d work,
// small_scratch_size(r) small).
template <typename acc_t>
struct MatrixSlot {
  acc_t* values;
  int64_t r, d;
  acc_t* work;
  acc_t* small;
};

// retract_'s matrices: the k matrices of one (k, r, d) tensor, block b on matrix b, the scratch
// laid out alike (no table to copy to the device).
template <typename acc_t>
struct UniformBatch {
  acc_t* values;
  acc_t* work_all;
  acc_t* small_all;
  int64_t r, d;
  __device__ MatrixSlot<acc_t> operator()(int64_t b) const {
    return {values + b * r * d, r, d, work_all + b * r * d,
            small_all + b * retraction::small_scratch_size(r)};
  }
};

// A row of retract_list_'s matrix table, built on the host (int64 values): the matrix's address,
// its shape, and the offsets of its scratch in the launch's work and small buffers.
struct TableRow {
  int64_t address, r, d, work, small;
};
constexpr int64_t kTableColumns = sizeof(TableRow) / sizeof(int64_t);

// retract_list_'s matrices: every matrix of every tensor of the list, block b on table row b.
template <typename acc_t>
struct MatrixTable {
  const TableRow* rows;
  acc_t* work_all;
  acc_t* small_all;
  __device__ MatrixSlot<acc_t> operator()(int64_t b) const {
    const TableRow row = rows[b];
    return {reinterpret_cast<acc_t*>(row.address), row.r, row.d, work_all + row.work,
            small_all + row.small};
  }
};

// One block per matrix (Matrices: UniformBatch or MatrixTable), so a few blocks per GPU:
// minBlocksPerSM = 1 lets ptxas keep the routines' state in registers (at its default budget it
// spilled on sm_80 and sm_90). non_finite counts the matrices holding NaN or Inf (left as they
// were when check_finite).
template <typename acc_t, typename Matrices>
__global__ void __launch_bounds__(kThreads, 1)
    retract_kernel(Matrices matrices, retraction::Method method, bool check_finite,
                   int* non_finite) {
  const MatrixSlot<acc_t> m = matrices(blockIdx.x);
  const BlockTeam team;
  const bool finite =
      retraction::retract_matrix(team, m.values, m.r, m.d, method, m.work, m.small, check_finite);
  if (!finite && team.leader()) atomicAdd(non_finite, 1);
}

// Launches retract_kernel on `count` matrices; returns the count of those holding NaN or Inf (an
// int tensor on the device, for raise_if_non_finite).
template <typename acc_t, typename Matrices>
at::Tensor launch_retract(const Matrices& matrices, int64_t count, retraction::Method method,
                          bool check_finite, const at::TensorOptions& options) {
  auto non_finite = at::zeros({}, options.dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  retract_kernel<acc_t, Matrices><<<static_cast<unsigned>(count), kThreads, 0, stream>>>(
      matrices, method, check_finite, non_finite.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return non_finite;
}

// The finite check: a device-side assert on the kernel's count, not a host check, so
// keep_orthonormal never synchronizes the host. Called once the results are written back (the
// emulated device raises at once).
void raise_if_non_finite(bool check_finite, const at::Tensor& non_finite) {
  if (check_finite) at::_assert_async(non_finite.eq(0), kNonFiniteMessage);
}

void retract_cuda(at::Tensor& R, c10::string_view method_name, bool check_finite) {
  const retraction::Method method = check_retract_args(R, method_name);
  const c10::cuda::CUDAGuard guard(R.device());
  const int64_t r = R.size(-2), d = R.size(-1);
  const int64_t batch = R.numel() / (r * d);
  if (batch == 0) return;
  const auto acc = accumulation_dtype(R.scalar_type());
  // Low-precision R is retracted in float32 and written back.
  at::Tensor values = R.scalar_type() == acc ? R : R.to(acc);
  auto work = at::empty({batch, r, d}, values.options());
  auto small = at::empty({batch, retraction::small_scratch_size(r)}, values.options());
  at::Tensor non_finite;
  AT_DISPATCH_FLOATING_TYPES(acc, "retract_cuda", [&] {
    const UniformBatch<scalar_t> matrices{values.mutable_data_ptr<scalar_t>(),
                                          work.mutable_data_ptr<scalar_t>(),
                                          small.mutable_data_ptr<scalar_t>(), r, d};
    non_finite = launch_retract<scalar_t>(matrices, batch, method, check_finite, values.options());
  });
  if (!values.is_same(R)) R.copy_(values);
  raise_if_non_finite(check_finite, non_finite);
}

// The tensors retract_list_ retracts in place: Rs themselves, or for low-precision Rs their
// float32 copies (written back after the launch).
std::vector<at::Tensor> accumulation_tensors(at::TensorList Rs) {
  const auto acc = accumulation_dtype(Rs[0].scalar_type());
  std::vector<at::Tensor> values;
  values.reserve(Rs.size());
  for (const at::Tensor& R : Rs) values.push_back(R.scalar_type() == acc ? R : R.to(acc));
  return values;
}

// The matrix table of `values` (one TableRow per matrix, scratch offsets packed in order) on
// `device`: filled in host memory, pinned when there is a device to copy to (so the copy is
// asynchronous and torch's host allocator keeps the buffer until it is done), one non-blocking
// copy. *work_size and *small_size receive the scratch sizes.
at::Tensor matrix_table(const std::vector<at::Tensor>& values, const at::Device& device,
                        int64_t* work_size, int64_t* small_size) {
  int64_t count = 0;
  for (const at::Tensor& v : values) count += v.numel() / (v.size(-2) * v.size(-1));
  auto host = at::empty({count, kTableColumns},
                        at::TensorOptions(at::kLong).pinned_memory(device.is_cuda()));
  auto* rows = reinterpret_cast<TableRow*>(host.mutable_data_ptr<int64_t>());
  *work_size = *small_size = 0;
  for (const at::Tensor& v : values) {
    const int64_t r = v.size(-2), d = v.size(-1);
    auto* base = static_cast<char*>(v.data_ptr());
    for (int64_t b = 0; b < v.numel() / (r * d); ++b) {
      const auto address = reinterpret_cast<int64_t>(base + b * r * d * v.element_size());
      *rows++ = {address, r, d, *work_size, *small_size};
      *work_size += r * d;
      *small_size += retraction::small_scratch_size(r);
    }
  }
  return host.to(host.options().device(device), /*non_blocking=*/true);
}

// Every matrix of every tensor of Rs in one launch, in place: no stacking, no copying back
// (except the float32 copies of low-precision tensors).
void retract_list_cuda(at::TensorList Rs, c10::string_view method_name, bool check_finite) {
  const retraction::Method method = check_retract_list_args(Rs, method_name);
  const c10::cuda::CUDAGuard guard(Rs[0].device());
  const std::vector<at::Tensor> values = accumulation_tensors(Rs);
  int64_t work_size, small_size;
  const at::Tensor table = matrix_table(values, Rs[0].device(), &work_size, &small_size);
  if (table.size(0) == 0) return;
  auto work = at::empty({work_size}, values[0].options());
  auto small = at::empty({small_size}, values[0].options());
  at::Tensor non_finite;
  AT_DISPATCH_FLOATING_TYPES(values[0].scalar_type(), "retract_list_cuda", [&] {
    const MatrixTable<scalar_t> matrices{reinterpret_cast<const TableRow*>(table.data_ptr()),
                                         work.mutable_data_ptr<scalar_t>(),
                                         small.mutable_data_ptr<scalar_t>()};
    non_finite = launch_retract<scalar_t>(matrices, table.size(0), method, check_finite,
                                          values[0].options());
  });
  for (size_t i = 0; i < Rs.size(); ++i) {
    if (!values[i].is_same(Rs[i])) at::Tensor(Rs[i]).copy_(values[i]);
  }
  raise_if_non_finite(check_finite, non_finite);
}

}  // namespace

TORCH_LIBRARY_IMPL(reft_ext, CUDA, m) {
  m.impl("retract_", &retract_cuda);
  m.impl("retract_list_", &retract_list_cuda);
}

}  // namespace reft_ext
