// CPU implementation of the single-adapter low-rank edit ops: rows split over threads with
// at::parallel_for; the row kernels are in csrc/cpu/edit_rows.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>

#include "../lowrank_edit.h"
#include "../lowrank_edit_checks.h"
#include "../lowrank_edit_outputs.h"
#include "edit_rows.h"

namespace reft_ext {
namespace {

using cpu::backward_rows;
using cpu::BackwardArgs;
using cpu::forward_rows;
using cpu::ForwardArgs;

std::tuple<at::Tensor, at::Tensor> lowrank_edit_forward_cpu(const at::Tensor& h,
                                                            const at::Tensor& P,
                                                            const at::Tensor& Q,
                                                            const at::Tensor& b) {
  check_forward_args(h, P, Q, b);
  const int64_t N = h.size(0), d = h.size(1), r = P.size(0);
  auto out = at::empty_like(h);
  auto z = at::empty({N, r}, P.options());
  REFT_DISPATCH_SUPPORTED(h.scalar_type(), "lowrank_edit_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto rows = isa_variant<&forward_rows<scalar_t>>();
    const ForwardArgs<scalar_t> args{h.const_data_ptr<scalar_t>(),
                                     P.const_data_ptr<acc_t>(),
                                     Q.const_data_ptr<acc_t>(),
                                     b.const_data_ptr<acc_t>(),
                                     out.mutable_data_ptr<scalar_t>(),
                                     z.mutable_data_ptr<acc_t>(),
                                     d,
                                     r};
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { rows(args, begin, end); });
  });
  return {out, z};
}

// Groups of rows_per_partial(N, r) rows each fill their own partial sums in parallel; the partials
// are then added in group order, so the result does not depend on the thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_edit_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
    const at::Tensor& z, std::array<bool, 4> output_mask) {
  check_backward_args(grad_out, h, P, Q, z);
  BackwardOutputs grads(h, P, output_mask);
  const int64_t N = h.size(0), d = h.size(1), r = P.size(0);
  if (N == 0 || d == 0 || !grads.any()) return grads.zero_filled();
  const bool want_params = grads.want_P() || grads.want_Q() || grads.want_b();
  const int64_t group_rows = rows_per_partial(N, r);
  const int64_t groups = ceil_div(N, group_rows);
  const int64_t partial_size = 2 * r * d + r;
  auto partials = at::zeros({want_params ? groups : 0, partial_size}, P.options());
  REFT_DISPATCH_SUPPORTED(h.scalar_type(), "lowrank_edit_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto rows = isa_variant<&backward_rows<scalar_t>>();
    const BackwardArgs<scalar_t> args{
        grad_out.const_data_ptr<scalar_t>(),
        h.const_data_ptr<scalar_t>(),
        P.const_data_ptr<acc_t>(),
        Q.const_data_ptr<acc_t>(),
        z.const_data_ptr<acc_t>(),
        grads.want_h() ? grads.grad_h.mutable_data_ptr<scalar_t>() : nullptr,
        grads.want_P(),
        grads.want_Q(),
        grads.want_b(),
        d,
        r};
    acc_t* partial_ptr = partials.mutable_data_ptr<acc_t>();
    at::parallel_for(0, groups, 1, [&](int64_t group_begin, int64_t group_end) {
      for (int64_t group = group_begin; group < group_end; ++group) {
        acc_t* partial = want_params ? partial_ptr + group * partial_size : nullptr;
        rows(args, partial, group * group_rows, std::min(N, (group + 1) * group_rows));
      }
    });
    if (!want_params) return;
    const int64_t first_group[2] = {0, groups};
    cpu::sum_partials<acc_t>(partial_ptr, first_group, 1, r, d, grads.targets<acc_t>());
  });
  return grads.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(reft_ext, CPU, m) {
  m.impl("lowrank_edit_forward", &lowrank_edit_forward_cpu);
  m.impl("lowrank_edit_backward", &lowrank_edit_backward_cpu);
}

}  // namespace reft_ext
