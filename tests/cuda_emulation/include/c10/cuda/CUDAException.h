// Stand-in for c10/cuda/CUDAException.h in the CUDA emulation: launches raise at once, so the check
// only records that the host code checked (a launch left unchecked is reported).
#pragma once

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::cuda_emu::launch_checked(__FILE__, __LINE__)
#define C10_CUDA_CHECK(expr) ((void)(expr))
