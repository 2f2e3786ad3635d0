// The gradients of the edits' backward ops, shared by the CPU and CUDA implementations: each of
// (grad_h, grad_P, grad_Q, grad_b) is allocated only where output_mask asks for it, and one that is
// not asked for comes back as an empty (0,) tensor whose work the kernels skip. Each has its
// input's shape: P is (r, d) for the single edit, (rp, d) for the activated one and (A, r, d) for
// the multi-adapter edit; grad_b is (P's rows,) or (A, r).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <tuple>

namespace reft_ext {

struct BackwardOutputs {
  std::array<bool, 4> mask;
  at::Tensor grad_h, grad_P, grad_Q, grad_b;

  BackwardOutputs(const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
                  std::array<bool, 4> output_mask)
      : mask(output_mask),
        grad_h(allocate(h, mask[0], h.sizes())),
        grad_P(allocate(P, mask[1], P.sizes())),
        grad_Q(allocate(Q, mask[2], Q.sizes())),
        grad_b(allocate(P, mask[3], P.sizes().slice(0, P.dim() - 1))) {}  // (r,) or (A, r)

  bool want_h() const { return mask[0]; }
  bool want_P() const { return mask[1]; }
  bool want_Q() const { return mask[2]; }
  bool want_b() const { return mask[3]; }
  bool any() const { return mask[0] || mask[1] || mask[2] || mask[3]; }

  // N = 0 or d = 0: no products to sum, so the parameter gradients are exact zeros.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> zero_filled() {
    grad_P.zero_();
    grad_Q.zero_();
    grad_b.zero_();
    return as_tuple();
  }

  // Data pointers of the wanted parameter gradients (∂P, ∂Q, ∂b), null for the others.
  template <typename acc_t>
  std::array<acc_t*, 3> targets() {
    return {want_P() ? grad_P.mutable_data_ptr<acc_t>() : nullptr,
            want_Q() ? grad_Q.mutable_data_ptr<acc_t>() : nullptr,
            want_b() ? grad_b.mutable_data_ptr<acc_t>() : nullptr};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple() const {
    return {grad_h, grad_P, grad_Q, grad_b};
  }

 private:
  static at::Tensor allocate(const at::Tensor& like, bool wanted, at::IntArrayRef sizes) {
    return wanted ? like.new_empty(sizes) : like.new_empty({0});
  }
};

}  // namespace reft_ext
