// CPU implementation of the single-adapter low-rank edit ops, plain (lowrank_edit_*) and activated
// (lowrank_edit_act_*): rows split over threads with at::parallel_for; the row kernels are in
// csrc/cpu/edit_rows.h.
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

using cpu::Activated;
using cpu::backward_rows;
using cpu::BackwardArgs;
using cpu::forward_rows;
using cpu::ForwardArgs;

// out and z (and, activated, v = h Pᵀ + b; v undefined for the plain edit) from h, P, Q, b.
void run_forward(const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q, const at::Tensor& b,
                 at::Tensor& out, at::Tensor& z, at::Tensor& v, Activation act) {
  const int64_t N = h.size(0), d = h.size(1), r = Q.size(0);
  REFT_DISPATCH_SUPPORTED(h.scalar_type(), "lowrank_edit_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto rows =
        isa_variant<&forward_rows<scalar_t>, &forward_rows<scalar_t, cpu::kWideEditStrips>>();
    const ForwardArgs<scalar_t> args{
        h.const_data_ptr<scalar_t>(),
        P.const_data_ptr<acc_t>(),
        Q.const_data_ptr<acc_t>(),
        b.const_data_ptr<acc_t>(),
        out.mutable_data_ptr<scalar_t>(),
        z.mutable_data_ptr<acc_t>(),
        d,
        r,
        nullptr,
        {v.defined() ? v.mutable_data_ptr<acc_t>() : nullptr, P.size(0), act}};
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { rows(args, begin, end); });
  });
}

// Groups of rows_per_partial(N, rp) rows each fill their own partial sums in parallel; the
// partials are then added in group order, so the result does not depend on the thread count.
// v undefined: the plain edit.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_backward(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
    const at::Tensor& z, const at::Tensor& v, Activation act, std::array<bool, 4> output_mask) {
  BackwardOutputs grads(h, P, Q, output_mask);
  const int64_t N = h.size(0), d = h.size(1), r = Q.size(0), rp = P.size(0);
  if (N == 0 || d == 0 || !grads.any()) return grads.zero_filled();
  const bool want_params = grads.want_P() || grads.want_Q() || grads.want_b();
  const int64_t group_rows = rows_per_partial(N, rp);
  const int64_t groups = ceil_div(N, group_rows);
  const int64_t partial_size = cpu::partial_size(rp, r, d);
  auto partials = at::zeros({want_params ? groups : 0, partial_size}, P.options());
  REFT_DISPATCH_SUPPORTED(h.scalar_type(), "lowrank_edit_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto rows =
        isa_variant<&backward_rows<scalar_t>, &backward_rows<scalar_t, cpu::kWideEditStrips>>();
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
        r,
        nullptr,
        // (the backward only reads v)
        {v.defined() ? const_cast<acc_t*>(v.const_data_ptr<acc_t>()) : nullptr, rp, act}};
    acc_t* partial_ptr = partials.mutable_data_ptr<acc_t>();
    at::parallel_for(0, groups, 1, [&](int64_t group_begin, int64_t group_end) {
      for (int64_t group = group_begin; group < group_end; ++group) {
        acc_t* partial = want_params ? partial_ptr + group * partial_size : nullptr;
        rows(args, partial, group * group_rows, std::min(N, (group + 1) * group_rows));
      }
    });
    if (!want_params) return;
    const int64_t first_group[2] = {0, groups};
    cpu::sum_partials<acc_t>(partial_ptr, first_group, 1, rp, r, d, grads.targets<acc_t>());
  });
  return grads.as_tuple();
}

std::tuple<at::Tensor, at::Tensor> lowrank_edit_forward_cpu(const at::Tensor& h,
                                                            const at::Tensor& P,
                                                            const at::Tensor& Q,
                                                            const at::Tensor& b) {
  check_forward_args(h, P, Q, b);
  auto out = at::empty_like(h);
  auto z = at::empty({h.size(0), P.size(0)}, P.options());
  at::Tensor no_v;
  run_forward(h, P, Q, b, out, z, no_v, Activation::kIdentity);
  return {out, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_edit_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
    const at::Tensor& z, std::array<bool, 4> output_mask) {
  check_backward_args(grad_out, h, P, Q, z);
  return run_backward(grad_out, h, P, Q, z, at::Tensor(), Activation::kIdentity, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_edit_act_forward_cpu(
    const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q, const at::Tensor& b,
    c10::string_view activation) {
  check_act_forward_args(h, P, Q, b);
  const Activation act = parse_activation(activation);
  auto out = at::empty_like(h);
  auto v = at::empty({h.size(0), P.size(0)}, P.options());
  auto z = at::empty({h.size(0), Q.size(0)}, P.options());
  run_forward(h, P, Q, b, out, z, v, act);
  return {out, v, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_edit_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
    const at::Tensor& v, const at::Tensor& z, c10::string_view activation,
    std::array<bool, 4> output_mask) {
  check_act_backward_args(grad_out, h, P, Q, v, z);
  return run_backward(grad_out, h, P, Q, z, v, parse_activation(activation), output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(reft_ext, CPU, m) {
  m.impl("lowrank_edit_forward", &lowrank_edit_forward_cpu);
  m.impl("lowrank_edit_backward", &lowrank_edit_backward_cpu);
  m.impl("lowrank_edit_act_forward", &lowrank_edit_act_forward_cpu);
  m.impl("lowrank_edit_act_backward", &lowrank_edit_act_backward_cpu);
}

}  // namespace reft_ext
