// CPU implementation of the retraction ops: the matrices of a batch (retract_) or of a list of
// tensors (retract_list_) in one parallel loop, each retracted by the single-threaded routines of
// csrc/retraction.h in float32 (float64 for float64 R).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "../retraction.h"
#include "../retraction_checks.h"
#include "isa_dispatch.h"
#include "retraction_passes.h"

namespace reft_ext {
namespace {

// retraction::retract_matrix's team on the CPU: one thread does everything, the d-long passes
// vectorized (retraction_passes.h). gram_lanes: cpu::gram_lane_count(r) values of scratch.
template <typename acc_t>
struct SerialTeam {
  acc_t* gram_lanes;
  REFT_HD bool leader() const { return true; }
  REFT_HD void sync() const {}
  REFT_HD int64_t first() const { return 0; }
  REFT_HD int64_t stride() const { return 1; }
  REFT_HD acc_t max_abs(const acc_t* x, int64_t n) const { return cpu::max_abs(x, n); }
  REFT_HD void gram(const acc_t* R, acc_t* S, int64_t r, int64_t d) const {
    cpu::gram(R, S, r, d, gram_lanes);
  }
  REFT_HD void solve_lower(const acc_t* L, acc_t* R, int64_t r, int64_t d) const {
    cpu::solve_lower(L, R, r, d);
  }
  REFT_HD void apply_left(const acc_t* X, acc_t* R, acc_t* work, int64_t r, int64_t d) const {
    retraction::apply_left_columns<1>(X, R, work, r, d, 0);
    for (int64_t e = 0; e < r * d; ++e) R[e] = work[e];
  }
  REFT_HD bool cholesky(acc_t* S, int64_t r, acc_t min_ratio) const {
    return retraction::cholesky_lower(S, r, min_ratio);
  }
  REFT_HD void multiply_into(acc_t* T, const acc_t* F, acc_t* tmp, int64_t r) const {
    retraction::multiply_into(T, F, tmp, r);
  }
  REFT_HD bool polar(acc_t* X, acc_t* work, int64_t r) const {
    return retraction::polar_small(X, work, r);
  }
};

template <typename acc_t>
REFT_ROW_INLINE bool retract_serial(acc_t* R, int64_t r, int64_t d, retraction::Method method,
                                    acc_t* work, acc_t* small, acc_t* gram_lanes,
                                    bool keep_non_finite) {
  return retraction::retract_matrix(SerialTeam<acc_t>{gram_lanes}, R, r, d, method, work, small,
                                    keep_non_finite);
}

// One r×d matrix of a call: a batch entry of one tensor, or of one tensor of a list.
template <typename scalar_t>
struct Matrix {
  scalar_t* data;
  int64_t r, d;
};

// The matrices of the contiguous (r, d) or (k, r, d) tensor R.
template <typename scalar_t>
void append_matrices(const at::Tensor& R, std::vector<Matrix<scalar_t>>& out) {
  const int64_t r = R.size(-2), d = R.size(-1);
  scalar_t* base = R.mutable_data_ptr<scalar_t>();
  for (int64_t i = 0; i < R.numel() / (r * d); ++i) out.push_back({base + i * r * d, r, d});
}

// Retracts every matrix, in parallel over matrices; returns how many held NaN or Inf (left as
// they were when check_finite, else set to NaN).
template <typename scalar_t>
int64_t retract_matrices(const std::vector<Matrix<scalar_t>>& matrices, retraction::Method method,
                         bool check_finite) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const auto retract_one = isa_variant<&retract_serial<acc_t>>();
  int64_t largest = 0, largest_r = 0;
  for (const auto& m : matrices) {
    largest = std::max(largest, m.r * m.d);
    largest_r = std::max(largest_r, m.r);
  }
  std::atomic<int64_t> non_finite{0};
  const auto count = static_cast<int64_t>(matrices.size());
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> work(largest), small(retraction::small_scratch_size(largest_r));
    std::vector<acc_t> gram_lanes(cpu::gram_lane_count(largest_r));
    std::vector<acc_t> converted(kConvert ? largest : 0);
    for (int64_t i = begin; i < end; ++i) {
      const Matrix<scalar_t>& m = matrices[i];
      const int64_t n = m.r * m.d;
      acc_t* values;
      if constexpr (kConvert) {
        for (int64_t e = 0; e < n; ++e) converted[e] = static_cast<acc_t>(m.data[e]);
        values = converted.data();
      } else {
        values = m.data;
      }
      const bool finite = retract_one(values, m.r, m.d, method, work.data(), small.data(),
                                      gram_lanes.data(), check_finite);
      if (!finite) non_finite.fetch_add(1, std::memory_order_relaxed);
      if constexpr (kConvert) {
        if (finite || !check_finite) {
          for (int64_t e = 0; e < n; ++e) m.data[e] = static_cast<scalar_t>(converted[e]);
        }
      }
    }
  });
  return non_finite.load();
}

void raise_if_non_finite(bool check_finite, int64_t non_finite, size_t matrices) {
  TORCH_CHECK_VALUE(!check_finite || non_finite == 0, kNonFiniteMessage, " (", non_finite, " of ",
                    matrices, " matrices)");
}

void retract_cpu(at::Tensor& R, c10::string_view method_name, bool check_finite) {
  const retraction::Method method = check_retract_args(R, method_name);
  REFT_DISPATCH_SUPPORTED(R.scalar_type(), "retract_cpu", [&] {
    std::vector<Matrix<scalar_t>> matrices;
    append_matrices(R, matrices);
    raise_if_non_finite(check_finite, retract_matrices(matrices, method, check_finite),
                        matrices.size());
  });
}

// Every matrix of every tensor in one parallel loop: no stacking, no copying back.
void retract_list_cpu(at::TensorList Rs, c10::string_view method_name, bool check_finite) {
  const retraction::Method method = check_retract_list_args(Rs, method_name);
  REFT_DISPATCH_SUPPORTED(Rs[0].scalar_type(), "retract_list_cpu", [&] {
    std::vector<Matrix<scalar_t>> matrices;
    for (const at::Tensor& R : Rs) append_matrices(R, matrices);
    raise_if_non_finite(check_finite, retract_matrices(matrices, method, check_finite),
                        matrices.size());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(reft_ext, CPU, m) {
  m.impl("retract_", &retract_cpu);
  m.impl("retract_list_", &retract_list_cpu);
}

}  // namespace reft_ext
