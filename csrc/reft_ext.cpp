// Operator schemas of the reft_ext library. Implementations register per device in csrc/cpu and
// csrc/cuda; the fake (meta) implementations and the autograd formula are registered beside each
// op in reft_ext/ops.py.
#include <torch/library.h>

#include <string>

#include "cpu/isa_dispatch.h"

TORCH_LIBRARY(reft_ext, m) {
  // out = h + (h Pᵀ + b) Q for h (N, d); also returns z = h Pᵀ + b (N, r), saved for backward.
  m.def("lowrank_edit_forward(Tensor h, Tensor P, Tensor Q, Tensor b) -> (Tensor out, Tensor z)");
  // Gradients of lowrank_edit_forward: (grad_h, grad_P, grad_Q, grad_b), each computed only where
  // output_mask asks for it; the others come back as empty (0,) tensors and their work is skipped.
  m.def(
      "lowrank_edit_backward(Tensor grad_out, Tensor h, Tensor P, Tensor Q, Tensor z, "
      "bool[4] output_mask) -> (Tensor grad_h, Tensor grad_P, Tensor grad_Q, Tensor grad_b)");
  // Per-row adapters: out[i] = h[i] + (h[i] P[a]ᵀ + b[a]) Q[a] with a = adapter[i] for P, Q
  // (A, r, d), b (A, r) and adapter (N,) int64 or int32 in [-1, A); -1 copies the row (z = 0).
  m.def(
      "lowrank_edit_multi_forward(Tensor h, Tensor P, Tensor Q, Tensor b, Tensor adapter) -> "
      "(Tensor out, Tensor z)");
  // Gradients of lowrank_edit_multi_forward, masked as lowrank_edit_backward's; grad_P, grad_Q
  // (A, r, d) and grad_b (A, r) sum each adapter's rows (zeros for an adapter with none).
  m.def(
      "lowrank_edit_multi_backward(Tensor grad_out, Tensor h, Tensor P, Tensor Q, Tensor z, "
      "Tensor adapter, bool[4] output_mask) -> (Tensor grad_h, Tensor grad_P, Tensor grad_Q, "
      "Tensor grad_b)");
  // Activated source: out = h + z Q with z = act(u) − s, where v = h Pᵀ + b = [u | s] for P (2r, d)
  // and b (2r,), or v = u (nothing subtracted) for P (r, d) and b (r,); Q (r, d). activation:
  // identity, relu, gelu, gelu_tanh, silu, sigmoid or tanh (csrc/activation.h). Returns v (N, rp)
  // and z (N, r), saved for backward.
  m.def(
      "lowrank_edit_act_forward(Tensor h, Tensor P, Tensor Q, Tensor b, str activation) -> "
      "(Tensor out, Tensor v, Tensor z)");
  // Gradients of lowrank_edit_act_forward, masked as lowrank_edit_backward's.
  m.def(
      "lowrank_edit_act_backward(Tensor grad_out, Tensor h, Tensor P, Tensor Q, Tensor v, "
      "Tensor z, str activation, bool[4] output_mask) -> (Tensor grad_h, Tensor grad_P, "
      "Tensor grad_Q, Tensor grad_b)");
  // Orthonormalizes the rows of R (r, d) or of each R[i] (k, r, d) in place. method: "cholqr2",
  // "qr" or "polar" (csrc/retraction.h).
  m.def("retract_(Tensor(a!) R, str method, bool check_finite=False) -> ()");
  // retract_ on every tensor of Rs (one dtype and device; shapes may differ), in one call: the
  // multi-tensor form, with no stacking or copying back.
  m.def("retract_list_(Tensor(a!)[] Rs, str method, bool check_finite=False) -> ()");
  // The CPU kernels' variant this process runs: "portable", "avx2" or "avx512"
  // (csrc/cpu/isa_dispatch.h). No tensor arguments, so one kernel for every backend.
  m.def("cpu_kernels() -> str", [] {
    return std::string(reft_ext::kCpuKernelNames[static_cast<int>(reft_ext::chosen_cpu_kernels())]);
  });
}
