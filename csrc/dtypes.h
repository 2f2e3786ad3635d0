// The row dtypes the kernels take and the accumulation rule: the C++ side's one copy of each
// (Python's is reft_ext/dtypes.py; acc_type in lowrank_edit.h is the same rule for kernel code).
#pragma once

#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>

namespace reft_ext {

inline constexpr const char* kSupportedDtypeNames = "float64, float32, bfloat16 or float16";

inline bool is_supported_dtype(c10::ScalarType dtype) {
  return dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 ||
         dtype == at::kHalf;
}

// float64 rows accumulate in float64, every other supported dtype in float32.
inline c10::ScalarType accumulation_dtype(c10::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace reft_ext

// AT_DISPATCH over exactly the supported dtypes (scalar_t inside the lambda).
#define REFT_DISPATCH_SUPPORTED(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
