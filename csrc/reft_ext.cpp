// Operator schemas of the reft_ext library. Implementations register per device in csrc/cpu and
// csrc/cuda; fake (meta) implementations and autograd live in reft_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(reft_ext, m) {
  // out = h + (h Pᵀ + b) Q for h (N, d); also returns z = h Pᵀ + b (N, r), saved for backward.
  m.def("lowrank_edit_forward(Tensor h, Tensor P, Tensor Q, Tensor b) -> (Tensor out, Tensor z)");
  // Gradients of lowrank_edit_forward: (grad_h, grad_P, grad_Q, grad_b).
  m.def(
      "lowrank_edit_backward(Tensor grad_out, Tensor h, Tensor P, Tensor Q, Tensor z) -> "
      "(Tensor grad_h, Tensor grad_P, Tensor grad_Q, Tensor grad_b)");
  // Orthonormalizes the rows of R (r, d) or of each R[i] (k, r, d) in place. method: 0 CholeskyQR2,
  // 1 Householder QR, 2 polar (csrc/retraction.h).
  m.def("retract_(Tensor(a!) R, int method) -> ()");
}
