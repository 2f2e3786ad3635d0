// CUDA runtime emulation: force-included (-include cuda_emu.h) into every rewritten .cu file so
// that the project's kernels and their ATen host code compile with the system C++ compiler and run
// on the CPU. Each CUDA thread of a block runs as a fiber (cuda_emu.cpp); __syncthreads is a block
// barrier, the warp intrinsics are exchanges between the lanes of a warp, and both check that every
// thread taking part waits at the same call site. rewrite.py turns `kernel<<<grid, block, smem,
// stream>>>(args)` into cuda_emu::launch(...) and `__shared__` declarations into
// cuda_emu::block_shared<T>(site).
#pragma once

#include <math.h>  // the float overloads of sqrt, fmax, ... in the global namespace, as CUDA has them

#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>

#define __CUDA_EMULATION__ 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// rewrite.py replaces every __shared__ declaration; one that reaches the compiler is a rewrite bug.
#define __shared__ cuda_emu_shared_declaration_not_rewritten

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719
};
constexpr int warpSize = 32;

namespace cuda_emu {

// Coordinates of the CUDA thread running on this OS thread (set by the scheduler at every switch).
struct Coordinates {
  uint3 thread_idx{0, 0, 0};
  uint3 block_idx{0, 0, 0};
  dim3 block_dim{1, 1, 1};
  dim3 grid_dim{1, 1, 1};
};
extern thread_local Coordinates coordinates;

// Where a kernel was launched: its name as written, the .cu file and line (kept by #line).
struct LaunchSite {
  const char* kernel;
  const char* file;
  int line;
};

// Runs `body` once per CUDA thread of the grid (throws std::runtime_error on any detected fault).
void run_grid(const LaunchSite& site, dim3 grid, dim3 block, size_t dynamic_shared,
              const std::function<void()>& body);

// A kernel launch (rewrite.py fills in the default shared memory size and stream): the arguments
// are copied once and converted to the kernel's parameter types, as CUDA copies them into the
// parameter space.
template <typename... Params, typename... Args>
void launch(const LaunchSite& site, dim3 grid, dim3 block, size_t dynamic_shared, cudaStream_t,
            void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong arity");
  const std::tuple<std::decay_t<Params>...> parameters(std::forward<Args>(args)...);
  run_grid(site, grid, block, dynamic_shared, [&] { std::apply(kernel, parameters); });
}

// Static shared memory of the running block for the declaration at `site` (one per type and site),
// filled with 0xFF bytes when the block starts using it.
void* block_shared_storage(const char* site, const std::type_info& type, size_t bytes,
                           size_t align);
template <typename T>
T& block_shared(const char* site) {
  return *static_cast<T*>(block_shared_storage(site, typeid(T), sizeof(T), alignof(T)));
}
// `extern __shared__ T name[]`: the launch's dynamic shared memory.
void* dynamic_shared_storage(const char* site);
template <typename T>
T* dynamic_shared(const char* site) {
  return static_cast<T*>(dynamic_shared_storage(site));
}

void syncthreads(const char* file, int line);
int syncthreads_reduce(const char* file, int line, int predicate, int op);  // 0 count, 1 and, 2 or

// Warp exchange: every lane named in `mask` deposits `value` at the same site; returns, for the
// calling lane, the value of its source lane (kind: 0 __shfl_sync's lane index, 1 xor, 2 down, 3
// up, 4 none: __syncwarp).
uint64_t warp_exchange(const char* file, int line, const char* what, unsigned mask, uint64_t value,
                       int kind, int arg, int width);
unsigned warp_vote(const char* file, int line, const char* what, unsigned mask, int predicate);
unsigned active_mask();

template <typename T>
T shuffle(const char* file, int line, const char* what, unsigned mask, T value, int kind, int arg,
          int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>,
                "shuffle of a type over 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_exchange(file, line, what, mask, bits, kind, arg, width);
  T result;
  std::memcpy(&result, &bits, sizeof(T));
  return result;
}

// Called by C10_CUDA_KERNEL_LAUNCH_CHECK: marks the last launch of this thread as checked.
void launch_checked(const char* file, int line);

// The extent of a CUDA host function (its c10::cuda::CUDAGuard): allocations are poisoned inside
// it; its end raises if the last launch was not checked.
void begin_device_scope();
void end_device_scope();

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::coordinates.thread_idx)
#define blockIdx (::cuda_emu::coordinates.block_idx)
#define blockDim (::cuda_emu::coordinates.block_dim)
#define gridDim (::cuda_emu::coordinates.grid_dim)

#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_count(p) ::cuda_emu::syncthreads_reduce(__FILE__, __LINE__, (p), 0)
#define __syncthreads_and(p) ::cuda_emu::syncthreads_reduce(__FILE__, __LINE__, (p), 1)
#define __syncthreads_or(p) ::cuda_emu::syncthreads_reduce(__FILE__, __LINE__, (p), 2)

#define __shfl_sync(mask, value, lane, ...)                                          \
  ::cuda_emu::shuffle(__FILE__, __LINE__, "__shfl_sync", (mask), (value), 0, (lane), \
                      CUDA_EMU_WIDTH(__VA_ARGS__))
#define __shfl_xor_sync(mask, value, lane_mask, ...)                                          \
  ::cuda_emu::shuffle(__FILE__, __LINE__, "__shfl_xor_sync", (mask), (value), 1, (lane_mask), \
                      CUDA_EMU_WIDTH(__VA_ARGS__))
#define __shfl_down_sync(mask, value, delta, ...)                                          \
  ::cuda_emu::shuffle(__FILE__, __LINE__, "__shfl_down_sync", (mask), (value), 2, (delta), \
                      CUDA_EMU_WIDTH(__VA_ARGS__))
#define __shfl_up_sync(mask, value, delta, ...)                                          \
  ::cuda_emu::shuffle(__FILE__, __LINE__, "__shfl_up_sync", (mask), (value), 3, (delta), \
                      CUDA_EMU_WIDTH(__VA_ARGS__))
// The optional width argument of the shuffles (default warpSize).
#define CUDA_EMU_WIDTH(...) CUDA_EMU_WIDTH_(__VA_ARGS__ __VA_OPT__(, ) 32, )
#define CUDA_EMU_WIDTH_(width, ...) width
#define __syncwarp(...)                                                                          \
  ((void)::cuda_emu::warp_exchange(__FILE__, __LINE__, "__syncwarp", CUDA_EMU_MASK(__VA_ARGS__), \
                                   0, 4, 0, 32))
#define CUDA_EMU_MASK(...) CUDA_EMU_WIDTH_(__VA_ARGS__ __VA_OPT__(, ) 0xffffffffu, )
#define __ballot_sync(mask, p) \
  ::cuda_emu::warp_vote(__FILE__, __LINE__, "__ballot_sync", (mask), (p))
#define __any_sync(mask, p) \
  (::cuda_emu::warp_vote(__FILE__, __LINE__, "__any_sync", (mask), (p)) != 0u)
#define __all_sync(mask, p) \
  (::cuda_emu::warp_vote(__FILE__, __LINE__, "__all_sync", (mask), (p)) == (mask))
#define __activemask() ::cuda_emu::active_mask()

// Atomics: std::atomic_ref on the plain memory (blocks may run concurrently on request).
template <typename T>
inline T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
inline T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value);
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;
}
// Replaces *address by value while `replaces(value, *address)`; returns the old value.
template <typename T, typename Replaces>
inline T atomic_replace_while(T* address, T value, Replaces replaces) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (replaces(value, old) && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
inline T atomicMax(T* address, T value) {
  return atomic_replace_while(address, value, [](T v, T old) { return old < v; });
}
template <typename T>
inline T atomicMin(T* address, T value) {
  return atomic_replace_while(address, value, [](T v, T old) { return v < old; });
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
inline T __ldg(const T* address) {
  return *address;
}
