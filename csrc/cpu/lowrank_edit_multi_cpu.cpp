// CPU implementation of the multi-adapter low-rank edit ops (out[i] = h[i] + (P[a] h[i] + b[a])
// Q[a] with a = adapter[i]; a = -1 copies the row).
//
// Rows are grouped by adapter (a stable counting sort: each adapter's rows in row order, then the
// unedited rows), as SGMV does: a block of rows then shares one adapter's factors, which the row
// kernels of csrc/cpu/edit_rows.h load once per block. Backward splits each adapter's rows into
// the groups rows_per_partial gives for that adapter's row count, so with every row on one adapter
// the work, the summation order and the result are bit for bit those of the single-adapter ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <vector>

#include "../lowrank_edit.h"
#include "../lowrank_edit_checks.h"
#include "../lowrank_edit_outputs.h"
#include "edit_rows.h"

namespace reft_ext {
namespace {

// Rows grouped by adapter. order[offsets[a] .. offsets[a + 1]) are adapter a's rows in row order,
// for a < A; order[offsets[A] .. N) are the rows with index -1.
struct AdapterSegments {
  std::vector<int64_t> order;
  std::vector<int64_t> offsets;  // A + 2 entries, offsets[A + 1] = N

  AdapterSegments(const at::Tensor& adapter, int64_t adapters) : offsets(adapters + 2, 0) {
    const at::Tensor index = adapter.to(at::kLong).contiguous();
    const int64_t* a = index.const_data_ptr<int64_t>();
    const int64_t n = index.numel();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(a[i] >= -1 && a[i] < adapters, "adapter[", i, "] = ", a[i],
                  " is outside [-1, A) for A = ", adapters, " adapters (P.size(0))");
      ++offsets[(a[i] < 0 ? adapters : a[i]) + 1];
    }
    for (int64_t s = 0; s <= adapters; ++s) offsets[s + 1] += offsets[s];
    order.resize(n);
    std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[next[a[i] < 0 ? adapters : a[i]]++] = i;
  }

  int64_t adapters() const { return static_cast<int64_t>(offsets.size()) - 2; }
  int64_t begin(int64_t segment) const { return offsets[segment]; }
  int64_t end(int64_t segment) const { return offsets[segment + 1]; }
};

// A run of sorted positions [begin, end) of one segment (segment A: the unedited rows) and, in
// backward, the partial-sum group it fills.
struct Chunk {
  int64_t segment, begin, end, group;
};

// Copies the rows order[begin .. end) of src into dst (rows of d elements).
template <typename scalar_t>
void copy_rows(const scalar_t* src, scalar_t* dst, const int64_t* order, int64_t begin, int64_t end,
               int64_t d) {
  for (int64_t n = begin; n < end; ++n) {
    std::memcpy(dst + order[n] * d, src + order[n] * d, d * sizeof(scalar_t));
  }
}

std::tuple<at::Tensor, at::Tensor> lowrank_edit_multi_forward_cpu(const at::Tensor& h,
                                                                  const at::Tensor& P,
                                                                  const at::Tensor& Q,
                                                                  const at::Tensor& b,
                                                                  const at::Tensor& adapter) {
  check_multi_forward_args(h, P, Q, b, adapter);
  const int64_t N = h.size(0), d = h.size(1), A = P.size(0), r = P.size(1);
  const AdapterSegments segments(adapter, A);
  auto out = at::empty_like(h);
  auto z = at::zeros({N, r}, P.options());  // unedited rows: z = 0
  // Chunks of at most `grain` rows (a multiple of the row block), never across adapters: large
  // enough that a chunk's setup (the row scratch) is small against its rows, small enough to
  // give every thread several chunks.
  const int64_t per_thread = ceil_div(N, 4 * static_cast<int64_t>(at::get_num_threads()));
  const int64_t grain = ceil_div(std::clamp<int64_t>(per_thread, 4, 256), 4) * 4;
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s <= A; ++s) {
    for (int64_t n = segments.begin(s); n < segments.end(s); n += grain) {
      chunks.push_back({s, n, std::min(n + grain, segments.end(s)), 0});
    }
  }
  REFT_DISPATCH_SUPPORTED(h.scalar_type(), "lowrank_edit_multi_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto rows = isa_variant<&cpu::forward_rows<scalar_t>,
                                  &cpu::forward_rows<scalar_t, cpu::kWideEditStrips>>();
    const scalar_t* h_ptr = h.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& chunk = chunks[c];
        if (chunk.segment == A) {
          copy_rows(h_ptr, out_ptr, segments.order.data(), chunk.begin, chunk.end, d);
          continue;
        }
        const int64_t factor = chunk.segment * r * d;
        const cpu::ForwardArgs<scalar_t> args{h_ptr,
                                              P.const_data_ptr<acc_t>() + factor,
                                              Q.const_data_ptr<acc_t>() + factor,
                                              b.const_data_ptr<acc_t>() + chunk.segment * r,
                                              out_ptr,
                                              z.mutable_data_ptr<acc_t>(),
                                              d,
                                              r,
                                              segments.order.data()};
        rows(args, chunk.begin, chunk.end);
      }
    });
  });
  return {out, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_edit_multi_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
    const at::Tensor& z, const at::Tensor& adapter, std::array<bool, 4> output_mask) {
  check_multi_backward_args(grad_out, h, P, Q, z, adapter);
  BackwardOutputs grads(h, P, Q, output_mask);
  const int64_t N = h.size(0), d = h.size(1), A = P.size(0), r = P.size(1);
  const AdapterSegments segments(adapter, A);  // checks the indices even when nothing is wanted
  if (N == 0 || d == 0 || !grads.any()) return grads.zero_filled();
  const bool want_params = grads.want_P() || grads.want_Q() || grads.want_b();
  // Each adapter's rows in groups of rows_per_partial(its row count, r), numbered in adapter
  // order: adapter a fills partials [first_group[a], first_group[a + 1]).
  std::vector<Chunk> chunks;
  std::vector<int64_t> first_group(A + 1, 0);
  for (int64_t s = 0; s < A; ++s) {
    const int64_t rows_of_s = segments.end(s) - segments.begin(s);
    const int64_t group_rows = rows_per_partial(rows_of_s, r);
    first_group[s + 1] = first_group[s] + ceil_div(rows_of_s, group_rows);
    for (int64_t n = segments.begin(s), g = first_group[s]; n < segments.end(s);
         n += group_rows, ++g) {
      chunks.push_back({s, n, std::min(n + group_rows, segments.end(s)), g});
    }
  }
  if (grads.want_h()) {  // the unedited rows pass their gradient through
    const int64_t grain = std::max<int64_t>(1, 32768 / d);
    for (int64_t n = segments.begin(A); n < N; n += grain) {
      chunks.push_back({A, n, std::min(n + grain, N), -1});
    }
  }
  const int64_t partial_size = cpu::partial_size(r, r, d);
  auto partials = at::zeros({want_params ? first_group[A] : 0, partial_size}, P.options());
  REFT_DISPATCH_SUPPORTED(h.scalar_type(), "lowrank_edit_multi_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto rows = isa_variant<&cpu::backward_rows<scalar_t>,
                                  &cpu::backward_rows<scalar_t, cpu::kWideEditStrips>>();
    acc_t* partial_ptr = partials.mutable_data_ptr<acc_t>();
    scalar_t* grad_h = grads.want_h() ? grads.grad_h.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& chunk = chunks[c];
        if (chunk.segment == A) {
          copy_rows(grad_out.const_data_ptr<scalar_t>(), grad_h, segments.order.data(), chunk.begin,
                    chunk.end, d);
          continue;
        }
        const int64_t factor = chunk.segment * r * d;
        const cpu::BackwardArgs<scalar_t> args{grad_out.const_data_ptr<scalar_t>(),
                                               h.const_data_ptr<scalar_t>(),
                                               P.const_data_ptr<acc_t>() + factor,
                                               Q.const_data_ptr<acc_t>() + factor,
                                               z.const_data_ptr<acc_t>(),
                                               grad_h,
                                               grads.want_P(),
                                               grads.want_Q(),
                                               grads.want_b(),
                                               d,
                                               r,
                                               segments.order.data()};
        rows(args, want_params ? partial_ptr + chunk.group * partial_size : nullptr, chunk.begin,
             chunk.end);
      }
    });
    if (want_params) {
      cpu::sum_partials<acc_t>(partial_ptr, first_group.data(), A, r, r, d, grads.targets<acc_t>());
    }
  });
  return grads.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(reft_ext, CPU, m) {
  m.impl("lowrank_edit_multi_forward", &lowrank_edit_multi_forward_cpu);
  m.impl("lowrank_edit_multi_backward", &lowrank_edit_multi_backward_cpu);
}

}  // namespace reft_ext
