// Schemas of the emulator's probe kernels (test_emulator.py): CUDA semantics the project's kernels
// may rely on, and launches the emulator must refuse.
#include <torch/library.h>

TORCH_LIBRARY(cuda_emu_probe, m) {
  // One block of x.numel() threads (int32, a multiple of 32); thread t returns its shuffle result.
  m.def("shuffle(Tensor x, int kind, Tensor arg, int width) -> Tensor");
  // Per thread: ballot of its warp, __syncthreads_count, __syncthreads_and, __syncthreads_or.
  m.def("votes(Tensor predicate) -> Tensor");
  // A kernel with the named fault writing into out (int32); raises the emulator's report.
  m.def("fault(Tensor out, str name) -> ()");
}
