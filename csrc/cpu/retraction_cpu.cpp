// CPU implementation of the retraction op: matrices of a batch in parallel, each retracted by the
// single-threaded routines of csrc/retraction.h in float32 (float64 for float64 R).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>
#include <vector>

#include "../retraction.h"
#include "../retraction_checks.h"
#include "isa_dispatch.h"

namespace reft_ext {
namespace {

// retraction::retract_matrix's team on the CPU: one thread does everything, the d-long passes
// vectorized along rows.
struct SerialTeam {
  REFT_HD bool leader() const { return true; }
  REFT_HD void sync() const {}
  REFT_HD bool share(bool value) const { return value; }
  REFT_HD int64_t first() const { return 0; }
  REFT_HD int64_t stride() const { return 1; }
  template <typename acc_t>
  REFT_HD acc_t max_abs(const acc_t* x, int64_t n) const {
    return retraction::max_abs_strided(x, n, 0, 1);
  }
  template <typename acc_t>
  REFT_HD void gram(const acc_t* R, acc_t* S, int64_t r, int64_t d) const {
    retraction::gram_rows(R, S, r, d);
  }
  template <typename acc_t>
  REFT_HD void solve_lower(const acc_t* L, acc_t* R, int64_t r, int64_t d) const {
    // Column chunks whose r rows stay in L1 while every row of the chunk is solved.
    constexpr int64_t kChunk = 256;
    for (int64_t c = 0; c < d; c += kChunk) {
      retraction::solve_lower_columns<1>(L, R, r, d, c, c + kChunk < d ? c + kChunk : d);
    }
  }
  template <typename acc_t>
  REFT_HD void apply_left(const acc_t* X, acc_t* R, acc_t* work, int64_t r, int64_t d) const {
    retraction::apply_left_columns<1>(X, R, work, r, d, 0);
    for (int64_t e = 0; e < r * d; ++e) R[e] = work[e];
  }
};

template <typename acc_t>
REFT_ROW_INLINE bool retract_serial(acc_t* R, int64_t r, int64_t d, retraction::Method method,
                                    acc_t* work, acc_t* small, bool keep_non_finite) {
  return retraction::retract_matrix(SerialTeam{}, R, r, d, method, work, small, keep_non_finite);
}

// Retracts the `batch` matrices (r×d each) at base, in parallel over matrices; returns how many
// held NaN or Inf (left as they were when check_finite, else set to NaN).
template <typename scalar_t>
int64_t retract_batch(scalar_t* base, int64_t batch, int64_t r, int64_t d,
                      retraction::Method method, bool check_finite) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const auto retract_one = isa_variant<&retract_serial<acc_t>>();
  std::atomic<int64_t> non_finite{0};
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> work(r * d), small(retraction::small_scratch_size(r));
    std::vector<acc_t> converted(kConvert ? r * d : 0);
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* matrix = base + i * r * d;
      acc_t* values;
      if constexpr (kConvert) {
        for (int64_t e = 0; e < r * d; ++e) converted[e] = static_cast<acc_t>(matrix[e]);
        values = converted.data();
      } else {
        values = matrix;
      }
      const bool finite =
          retract_one(values, r, d, method, work.data(), small.data(), check_finite);
      if (!finite) non_finite.fetch_add(1, std::memory_order_relaxed);
      if constexpr (kConvert) {
        if (finite || !check_finite) {
          for (int64_t e = 0; e < r * d; ++e) matrix[e] = static_cast<scalar_t>(converted[e]);
        }
      }
    }
  });
  return non_finite.load();
}

void retract_cpu(at::Tensor& R, c10::string_view method_name, bool check_finite) {
  const retraction::Method method = check_retract_args(R, method_name);
  const int64_t r = R.size(-2), d = R.size(-1);
  const int64_t batch = R.numel() / (r * d);
  int64_t non_finite = 0;
  REFT_DISPATCH_SUPPORTED(R.scalar_type(), "retract_cpu", [&] {
    non_finite = retract_batch(R.mutable_data_ptr<scalar_t>(), batch, r, d, method, check_finite);
  });
  TORCH_CHECK_VALUE(!check_finite || non_finite == 0, kNonFiniteMessage, " (", non_finite, " of ",
                    batch, " matrices)");
}

}  // namespace

TORCH_LIBRARY_IMPL(reft_ext, CPU, m) { m.impl("retract_", &retract_cpu); }

}  // namespace reft_ext
