// Activations of the learned source for the activated edit (lowrank_edit_act), shared by the CPU
// and CUDA kernels: act(x) and its derivative act'(x), in acc_t. The op takes them by name; the
// name table (and its error) is in csrc/lowrank_edit_checks.h. Formulas are torch's
// (torch.nn.functional's relu, gelu with approximate "none" and "tanh", silu, sigmoid, tanh).
#pragma once

#include <cmath>
#include <cstdint>

#include "lowrank_edit.h"

namespace reft_ext {

enum class Activation : int64_t { kIdentity, kRelu, kGelu, kGeluTanh, kSilu, kSigmoid, kTanh };
// The ops' names of the activations, in the enum's order (reft_ext.functional.ACTIVATIONS holds
// the same list for Python).
constexpr const char* kActivationNames[] = {"identity", "relu",    "gelu", "gelu_tanh",
                                            "silu",     "sigmoid", "tanh"};

template <typename acc_t>
REFT_HD acc_t logistic(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

// tanh's argument of the tanh-approximated GELU: √(2/π) (x + 0.044715 x³).
template <typename acc_t>
REFT_HD acc_t gelu_tanh_inner(acc_t x) {
  return acc_t(0.7978845608028654) * (x + acc_t(0.044715) * x * x * x);
}

template <typename acc_t>
REFT_HD acc_t activate(Activation act, acc_t x) {
  switch (act) {
    case Activation::kRelu:
      return x > acc_t(0) ? x : acc_t(0);
    case Activation::kGelu:
      return acc_t(0.5) * x * (acc_t(1) + std::erf(x * acc_t(0.7071067811865476)));
    case Activation::kGeluTanh:
      return acc_t(0.5) * x * (acc_t(1) + std::tanh(gelu_tanh_inner(x)));
    case Activation::kSilu:
      return x * logistic(x);
    case Activation::kSigmoid:
      return logistic(x);
    case Activation::kTanh:
      return std::tanh(x);
    default:
      return x;
  }
}

// d act / dx at x (relu's is 0 at 0, as torch's).
template <typename acc_t>
REFT_HD acc_t activate_grad(Activation act, acc_t x) {
  switch (act) {
    case Activation::kRelu:
      return x > acc_t(0) ? acc_t(1) : acc_t(0);
    case Activation::kGelu: {
      const acc_t cdf = acc_t(0.5) * (acc_t(1) + std::erf(x * acc_t(0.7071067811865476)));
      const acc_t pdf = acc_t(0.3989422804014327) * std::exp(acc_t(-0.5) * x * x);
      return cdf + x * pdf;
    }
    case Activation::kGeluTanh: {
      const acc_t t = std::tanh(gelu_tanh_inner(x));
      const acc_t inner_grad = acc_t(0.7978845608028654) * (acc_t(1) + acc_t(3 * 0.044715) * x * x);
      return acc_t(0.5) * (acc_t(1) + t) + acc_t(0.5) * x * (acc_t(1) - t * t) * inner_grad;
    }
    case Activation::kSilu: {
      const acc_t s = logistic(x);
      return s * (acc_t(1) + x * (acc_t(1) - s));
    }
    case Activation::kSigmoid: {
      const acc_t s = logistic(x);
      return s * (acc_t(1) - s);
    }
    case Activation::kTanh: {
      const acc_t t = std::tanh(x);
      return acc_t(1) - t * t;
    }
    default:
      return acc_t(1);
  }
}

// The activated edit's z and ∂v for one row, from v = h Pᵀ + b (rp values: u = v[0, r), and, when
// rp = 2r, s = v[r, 2r) is subtracted): z[k] = act(u[k]) − s[k]; given gz = ∂out Qᵀ (r values),
// coef = ∂v = [act'(u) gz, −gz] (rp values). Shared by the kernels of both back-ends.
template <typename acc_t>
REFT_HD void activated_z(Activation act, const acc_t* v, int64_t r, int64_t rp, acc_t* z) {
  for (int64_t k = 0; k < r; ++k) z[k] = activate(act, v[k]) - (rp > r ? v[r + k] : acc_t(0));
}

template <typename acc_t>
REFT_HD void activated_coef(Activation act, const acc_t* v, const acc_t* gz, int64_t r, int64_t rp,
                            acc_t* coef) {
  for (int64_t k = 0; k < r; ++k) coef[k] = activate_grad(act, v[k]) * gz[k];
  for (int64_t k = r; k < rp; ++k) coef[k] = -gz[k - r];
}

}  // namespace reft_ext
