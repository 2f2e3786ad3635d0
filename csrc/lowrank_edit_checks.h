// Argument checks shared by the CPU and CUDA implementations of the low-rank edit ops.
// The Python wrappers give friendlier messages first; these guard direct torch.ops calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <iterator>
#include <string>

#include "activation.h"
#include "dtypes.h"

namespace reft_ext {

// h: (N, d) contiguous float64/float32/bfloat16/float16 (also used for grad_out).
inline void check_rows(const at::Tensor& h, const char* name) {
  TORCH_CHECK(h.dim() == 2, name, " must be 2-D (N, d), got ", h.dim(), "-D");
  TORCH_CHECK(h.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(is_supported_dtype(h.scalar_type()), name, " must be ", kSupportedDtypeNames,
              ", got ", h.scalar_type());
}

// t: contiguous, of `sizes`, in h's accumulation dtype (float64 for float64 h, float32 otherwise),
// on h's device.
inline void check_param(const at::Tensor& t, const char* name, at::IntArrayRef sizes,
                        const at::Tensor& h) {
  TORCH_CHECK(t.sizes() == sizes, name, " must have shape ", sizes, ", got ", t.sizes());
  const auto acc = accumulation_dtype(h.scalar_type());
  TORCH_CHECK(t.scalar_type() == acc, name, " must be ", acc, " for ", h.scalar_type(),
              " rows, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device() == h.device(), name, " must be on ", h.device(), ", got ", t.device());
}

// P, Q: (r, d) with r >= 1 and d = h.size(1).
inline void check_factors(const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q) {
  check_rows(h, "h");
  TORCH_CHECK(P.dim() == 2 && P.size(0) >= 1, "P must be 2-D (r, d) with r >= 1, got ", P.sizes());
  check_param(P, "P", {P.size(0), h.size(1)}, h);
  check_param(Q, "Q", P.sizes(), h);
}

inline void check_forward_args(const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
                               const at::Tensor& b) {
  check_factors(h, P, Q);
  check_param(b, "b", {P.size(0)}, h);
}

// grad_out: h's shape, dtype and device.
inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& h) {
  check_rows(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == h.sizes() && grad_out.scalar_type() == h.scalar_type() &&
                  grad_out.device() == h.device(),
              "grad_out must match h (", h.scalar_type(), " ", h.sizes(), " on ", h.device(),
              "), got ", grad_out.scalar_type(), " ", grad_out.sizes(), " on ", grad_out.device());
}

// grad_out like h; z (N, r) in the accumulation dtype.
inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& h,
                                const at::Tensor& P, const at::Tensor& Q, const at::Tensor& z) {
  check_factors(h, P, Q);
  check_grad_out(grad_out, h);
  check_param(z, "z", {h.size(0), P.size(0)}, h);
}

// Multi-adapter edit: P, Q (A, r, d) with r >= 1; b (A, r); adapter (N,) int64 or int32 on h's
// device (its values are checked by the kernels: on CPU at once, on CUDA by a device-side assert).
inline void check_multi_factors(const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
                                const at::Tensor& adapter) {
  check_rows(h, "h");
  TORCH_CHECK(P.dim() == 3 && P.size(1) >= 1, "P must be 3-D (A, r, d) with r >= 1, got ",
              P.sizes());
  check_param(P, "P", {P.size(0), P.size(1), h.size(1)}, h);
  check_param(Q, "Q", P.sizes(), h);
  TORCH_CHECK(adapter.dim() == 1 && adapter.size(0) == h.size(0), "adapter must have shape (",
              h.size(0), ",) (one index per row of h), got ", adapter.sizes());
  TORCH_CHECK(adapter.scalar_type() == at::kLong || adapter.scalar_type() == at::kInt,
              "adapter must be int64 or int32, got ", adapter.scalar_type());
  TORCH_CHECK(adapter.device() == h.device(), "adapter must be on ", h.device(), ", got ",
              adapter.device());
}

inline void check_multi_forward_args(const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
                                     const at::Tensor& b, const at::Tensor& adapter) {
  check_multi_factors(h, P, Q, adapter);
  check_param(b, "b", {P.size(0), P.size(1)}, h);
}

inline void check_multi_backward_args(const at::Tensor& grad_out, const at::Tensor& h,
                                      const at::Tensor& P, const at::Tensor& Q, const at::Tensor& z,
                                      const at::Tensor& adapter) {
  check_multi_factors(h, P, Q, adapter);
  check_grad_out(grad_out, h);
  check_param(z, "z", {h.size(0), P.size(1)}, h);
}

// Activated edit: Q (r, d) with r >= 1, P (rp, d) and b (rp,) with rp = r (z = act(u)) or 2r
// (z = act(u) − s).
inline void check_act_factors(const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q) {
  check_rows(h, "h");
  TORCH_CHECK(Q.dim() == 2 && Q.size(0) >= 1, "Q must be 2-D (r, d) with r >= 1, got ", Q.sizes());
  check_param(Q, "Q", {Q.size(0), h.size(1)}, h);
  TORCH_CHECK(P.dim() == 2 && (P.size(0) == Q.size(0) || P.size(0) == 2 * Q.size(0)),
              "P must be 2-D (rp, d) with rp = r or 2r for Q's r = ", Q.size(0), ", got ",
              P.sizes());
  check_param(P, "P", {P.size(0), h.size(1)}, h);
}

inline void check_act_forward_args(const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
                                   const at::Tensor& b) {
  check_act_factors(h, P, Q);
  check_param(b, "b", {P.size(0)}, h);
}

// grad_out like h; v (N, rp) and z (N, r) in the accumulation dtype.
inline void check_act_backward_args(const at::Tensor& grad_out, const at::Tensor& h,
                                    const at::Tensor& P, const at::Tensor& Q, const at::Tensor& v,
                                    const at::Tensor& z) {
  check_act_factors(h, P, Q);
  check_grad_out(grad_out, h);
  check_param(v, "v", {h.size(0), P.size(0)}, h);
  check_param(z, "z", {h.size(0), Q.size(0)}, h);
}

// The activation called `name` (kActivationNames).
inline Activation parse_activation(c10::string_view name) {
  std::string names;
  for (size_t i = 0; i < std::size(kActivationNames); ++i) {
    if (name == kActivationNames[i]) return static_cast<Activation>(i);
    names += (i ? ", " : "") + std::string(kActivationNames[i]);
  }
  TORCH_CHECK_VALUE(false, "activation must be one of ", names, "; got '", std::string(name), "'");
}

}  // namespace reft_ext
