// Stand-in for c10/cuda/CUDAGuard.h in the CUDA emulation: the guard takes any device (emulated
// tensors live on the CPU) and marks the extent of the host function
// (cuda_emu::begin_device_scope).
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) { cuda_emu::begin_device_scope(); }
  explicit CUDAGuard(c10::DeviceIndex) { cuda_emu::begin_device_scope(); }
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
  // May throw: an unchecked launch is reported when the host function returns.
  ~CUDAGuard() noexcept(false) { cuda_emu::end_device_scope(); }
};
using OptionalCUDAGuard = CUDAGuard;

}  // namespace c10::cuda
