// Probe kernels of the CUDA emulator's tests: the intrinsics' results, and faults it must report.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

namespace {

__global__ void shuffle_kernel(const int* x, const int* arg, int* out, int kind, int width) {
  const int t = threadIdx.x;
  int value = 0;
  if (kind == 0) value = __shfl_sync(0xffffffffu, x[t], arg[t], width);
  if (kind == 1) value = __shfl_xor_sync(0xffffffffu, x[t], arg[t], width);
  if (kind == 2) value = __shfl_down_sync(0xffffffffu, x[t], arg[t], width);
  if (kind == 3) value = __shfl_up_sync(0xffffffffu, x[t], arg[t], width);
  out[t] = value;
}

__global__ void votes_kernel(const int* predicate, int* out) {
  const int t = threadIdx.x, n = blockDim.x;
  const int p = predicate[t];
  out[t] = static_cast<int>(__ballot_sync(0xffffffffu, p));
  out[n + t] = __syncthreads_count(p);
  out[2 * n + t] = __syncthreads_and(p);
  out[3 * n + t] = __syncthreads_or(p);
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void mask_without_caller_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1, 0);  // lanes 16-31 are not in the mask
}

__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x % 32 == 31) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
}

__global__ void large_shared_kernel(int* out) {
  __shared__ float big[13 * 1024];  // 52 KiB: over the 48 KiB a kernel gets without opting in
  big[threadIdx.x] = 1.0f;
  out[threadIdx.x] = static_cast<int>(big[threadIdx.x]);
}

__global__ void shared_overflow_kernel(int* out) {
  __shared__ int small[32];
  small[threadIdx.x] = 1;  // 40 threads write a 32-element array: 32 bytes into its canary
  out[threadIdx.x] = 0;
}

__global__ void plain_kernel(int* out) { out[threadIdx.x] = 1; }

at::Tensor shuffle(const at::Tensor& x, int64_t kind, const at::Tensor& arg, int64_t width) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  shuffle_kernel<<<1, static_cast<unsigned>(x.numel()), 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<int>(), arg.const_data_ptr<int>(), out.mutable_data_ptr<int>(),
      static_cast<int>(kind), static_cast<int>(width));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor votes(const at::Tensor& predicate) {
  const c10::cuda::CUDAGuard guard(predicate.device());
  auto out = at::empty({4 * predicate.numel()}, predicate.options());
  votes_kernel<<<1, static_cast<unsigned>(predicate.numel())>>>(predicate.const_data_ptr<int>(),
                                                                out.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// out: int32, 2048 elements (1023 for write-past-buffer: one short of its 1024 threads), allocated
// here so that it carries the emulator's canaries.
void fault(const at::Tensor& like, c10::string_view name_view) {
  const std::string name(name_view);
  const c10::cuda::CUDAGuard guard(like.device());
  auto out = at::empty({name == "write-past-buffer" ? 1023 : 2048}, like.options());
  int* o = out.mutable_data_ptr<int>();
  if (name == "too-many-threads") plain_kernel<<<1, 1025>>>(o);
  if (name == "empty-grid") plain_kernel<<<0, 32>>>(o);
  if (name == "divergent-barrier") divergent_barrier_kernel<<<1, 128>>>(o);
  if (name == "mask-without-caller") mask_without_caller_kernel<<<1, 32>>>(o);
  if (name == "exited-lane") exited_lane_kernel<<<1, 64>>>(o);
  if (name == "large-shared") large_shared_kernel<<<1, 32>>>(o);
  if (name == "shared-overflow") shared_overflow_kernel<<<1, 40>>>(o);
  if (name == "write-past-buffer") plain_kernel<<<1, 1024>>>(o);
  if (name == "unchecked-launch") {
    plain_kernel<<<1, 32>>>(o);
    return;  // no C10_CUDA_KERNEL_LAUNCH_CHECK
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(cuda_emu_probe, CUDA, m) {
  m.impl("shuffle", &shuffle);
  m.impl("votes", &votes);
  m.impl("fault", &fault);
}
