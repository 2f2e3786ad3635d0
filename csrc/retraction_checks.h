// Argument checks of the retraction op, shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "dtypes.h"
#include "retraction.h"

namespace reft_ext {

// The error of check_finite=True; the matrices that hold NaN or Inf are left as they were.
constexpr const char* kNonFiniteMessage =
    "R contains NaN or Inf; cannot orthonormalize it (those matrices are left as they were; "
    "check_finite=False returns them as NaN)";

// R: contiguous (r, d) or (k, r, d) floating tensor with 1 <= r <= d, writable in place here (not
// a leaf that requires grad while grad mode is on, not an inference tensor outside inference
// mode); method "cholqr2", "qr" or "polar" (the names of reft_ext.retraction.METHODS), returned as
// a Method.
// "cholqr2", "qr" or "polar" (the names of reft_ext.retraction.METHODS) as a Method.
inline retraction::Method check_method(c10::string_view method) {
  if (method == "cholqr2") return retraction::kCholQR2;
  if (method == "qr") return retraction::kQR;
  TORCH_CHECK(method == "polar", "method must be \"cholqr2\", \"qr\" or \"polar\", got \"", method,
              "\"");
  return retraction::kPolar;
}

inline retraction::Method check_retract_args(const at::Tensor& R, c10::string_view method) {
  TORCH_CHECK(R.dim() == 2 || R.dim() == 3, "R must have shape (r, d) or (k, r, d), got ",
              R.sizes());
  TORCH_CHECK(R.is_contiguous(), "R must be contiguous");
  // The in-place rules torch's own ops follow (the op has no autograd formula to enforce them).
  TORCH_CHECK(!(R.requires_grad() && R.is_leaf() && at::GradMode::is_enabled()),
              "R is a leaf tensor that requires grad: retract it under torch.no_grad() (as an "
              "optimizer step does; reft_ext.retract_ does this itself)");
  TORCH_CHECK(!R.is_inference() || c10::InferenceMode::is_enabled(),
              "R is an inference tensor: it can only be modified in place inside "
              "torch.inference_mode()");
  TORCH_CHECK(is_supported_dtype(R.scalar_type()), "R must be ", kSupportedDtypeNames, ", got ",
              R.scalar_type());
  const int64_t r = R.size(-2), d = R.size(-1);
  TORCH_CHECK(r >= 1 && r <= d, "R must have 1 <= r <= d rows to be orthonormal, got r = ", r,
              ", d = ", d);
  return check_method(method);
}

// Rs: tensors each passing check_retract_args, all of Rs[0]'s dtype and device. (An empty list
// never reaches a kernel: the dispatcher needs a tensor to choose one.)
inline retraction::Method check_retract_list_args(at::TensorList Rs, c10::string_view method) {
  retraction::Method checked = check_method(method);
  for (size_t i = 0; i < Rs.size(); ++i) {
    try {
      checked = check_retract_args(Rs[i], method);
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, "Rs[", i, "]: ", error.what_without_backtrace());
    }
    TORCH_CHECK(Rs[i].scalar_type() == Rs[0].scalar_type() && Rs[i].device() == Rs[0].device(),
                "Rs[", i, "] must have Rs[0]'s dtype and device (", Rs[0].scalar_type(), " on ",
                Rs[0].device(), "), got ", Rs[i].scalar_type(), " on ", Rs[i].device());
  }
  return checked;
}

}  // namespace reft_ext
