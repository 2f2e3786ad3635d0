// Stand-in for c10/cuda/CUDAStream.h in the CUDA emulation: one stream, launches run in order.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

}  // namespace c10::cuda
