// CUDA implementation of the retraction op: one block per matrix of the batch, one launch, running
// the control flow of csrc/retraction.h that the CPU back-end runs. The d-long passes (Gram
// matrix, triangular solve, polar apply) are split over the block's threads; the r×r
// factorizations and the rare Householder fallback run on thread 0.
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

#include "../retraction.h"
#include "../retraction_checks.h"
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

// retraction::retract_matrix's team on CUDA: the block. Thread 0 leads; the d-long passes are
// split over the threads (coalesced: neighbouring threads take neighbouring columns).
struct BlockTeam {
  int* flag;  // shared memory: share()'s value
  __device__ bool leader() const { return threadIdx.x == 0; }
  __device__ void sync() const { __syncthreads(); }
  __device__ bool share(bool value) const {
    if (leader()) *flag = value;
    __syncthreads();
    const bool shared = *flag;
    __syncthreads();  // every thread has read it before the leader can write the next one
    return shared;
  }
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
};

// One block per matrix, so a few blocks per GPU: minBlocksPerSM = 1 lets ptxas keep the r×r
// routines' state in registers (at its default budget it spilled on sm_80 and sm_90).
// non_finite counts the matrices holding NaN or Inf (left as they were when check_finite).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    retract_kernel(acc_t* values, acc_t* work_all, acc_t* small_all, int64_t r, int64_t d,
                   retraction::Method method, bool check_finite, int* non_finite) {
  __shared__ int flag;
  const int64_t b = blockIdx.x;
  const BlockTeam team{&flag};
  const bool finite =
      retraction::retract_matrix(team, values + b * r * d, r, d, method, work_all + b * r * d,
                                 small_all + b * retraction::small_scratch_size(r), check_finite);
  if (!finite && team.leader()) atomicAdd(non_finite, 1);
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
  auto non_finite = at::zeros({}, values.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "retract_cuda", [&] {
    retract_kernel<scalar_t><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
        values.mutable_data_ptr<scalar_t>(), work.mutable_data_ptr<scalar_t>(),
        small.mutable_data_ptr<scalar_t>(), r, d, method, check_finite,
        non_finite.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!values.is_same(R)) R.copy_(values);
  // A device-side assert, not a host check: keep_orthonormal never synchronizes the host.
  if (check_finite) at::_assert_async(non_finite.eq(0), kNonFiniteMessage);
}

}  // namespace

// The list form, one launch per tensor for now (a single launch over every matrix needs a device
// table of the tensors' pointers and shapes).
void retract_list_cuda(at::TensorList Rs, c10::string_view method_name, bool check_finite) {
  check_retract_list_args(Rs, method_name);
  for (const at::Tensor& R : Rs) {
    at::Tensor target = R;  // retract_cuda takes a non-const reference
    retract_cuda(target, method_name, check_finite);
  }
}

TORCH_LIBRARY_IMPL(reft_ext, CUDA, m) {
  m.impl("retract_", &retract_cuda);
  m.impl("retract_list_", &retract_list_cuda);
}

}  // namespace reft_ext
