// Argument checks of the retraction op, shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "retraction.h"

namespace reft_ext {

// R: contiguous (r, d) or (k, r, d) floating tensor with 1 <= r <= d; method one of Method.
inline void check_retract_args(const at::Tensor& R, int64_t method) {
  TORCH_CHECK(R.dim() == 2 || R.dim() == 3, "R must have shape (r, d) or (k, r, d), got ",
              R.sizes());
  TORCH_CHECK(R.is_contiguous(), "R must be contiguous");
  const auto dtype = R.scalar_type();
  TORCH_CHECK(
      dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
      "R must be float64, float32, bfloat16 or float16, got ", dtype);
  const int64_t r = R.size(-2), d = R.size(-1);
  TORCH_CHECK(r >= 1 && r <= d, "R must have 1 <= r <= d rows to be orthonormal, got r = ", r,
              ", d = ", d);
  TORCH_CHECK(method >= retraction::kCholQR2 && method <= retraction::kPolar,
              "method must be 0 (cholqr2), 1 (qr) or 2 (polar), got ", method);
}

}  // namespace reft_ext
