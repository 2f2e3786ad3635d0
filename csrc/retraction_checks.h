// Argument checks of the retraction op, shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "dtypes.h"
#include "retraction.h"

namespace reft_ext {

// R: contiguous (r, d) or (k, r, d) floating tensor with 1 <= r <= d; method "cholqr2", "qr" or
// "polar" (the names of reft_ext.retraction.METHODS), returned as a Method.
inline retraction::Method check_retract_args(const at::Tensor& R, c10::string_view method) {
  TORCH_CHECK(R.dim() == 2 || R.dim() == 3, "R must have shape (r, d) or (k, r, d), got ",
              R.sizes());
  TORCH_CHECK(R.is_contiguous(), "R must be contiguous");
  TORCH_CHECK(is_supported_dtype(R.scalar_type()), "R must be ", kSupportedDtypeNames, ", got ",
              R.scalar_type());
  const int64_t r = R.size(-2), d = R.size(-1);
  TORCH_CHECK(r >= 1 && r <= d, "R must have 1 <= r <= d rows to be orthonormal, got r = ", r,
              ", d = ", d);
  if (method == "cholqr2") return retraction::kCholQR2;
  if (method == "qr") return retraction::kQR;
  TORCH_CHECK(method == "polar", "method must be \"cholqr2\", \"qr\" or \"polar\", got \"", method,
              "\"");
  return retraction::kPolar;
}

}  // namespace reft_ext
