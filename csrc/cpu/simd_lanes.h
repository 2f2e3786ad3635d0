// One 32-byte register of accumulators as a compiler vector (GCC/clang vector extensions), for the
// CPU row loops: 8 floats (4 doubles) — a ymm register in the AVX2 build, two xmm in the portable
// one. The strip primitives of csrc/lowrank_edit.h work on acc_t[V] arrays, which the compiler
// vectorizes per call but keeps on the stack between calls (a load and a store per FMA); values
// of a vector type stay in registers across a whole row block.
#pragma once

#include <cstdint>
#include <cstring>

#include "../lowrank_edit.h"
#include "isa_dispatch.h"

namespace reft_ext {

constexpr int kVectorBytes = 32;

template <typename acc_t>
struct Vec {
  static constexpr int kLanes = kVectorBytes / sizeof(acc_t);
  typedef acc_t type __attribute__((vector_size(kVectorBytes)));
};
template <typename acc_t>
using vec_t = typename Vec<acc_t>::type;

template <typename acc_t>
REFT_ROW_INLINE vec_t<acc_t> load_vec(const acc_t* src) {
  vec_t<acc_t> v;
  std::memcpy(&v, src, sizeof(v));  // unaligned load
  return v;
}

// load_vec, but as one load into a register: a value used by several FMAs is otherwise folded
// into each of them as a memory operand (GCC does), one load per FMA. The volatile access must
// happen exactly once, so it cannot be folded or repeated.
template <typename acc_t>
REFT_ROW_INLINE vec_t<acc_t> load_vec_once(const acc_t* src) {
  typedef acc_t unaligned_t __attribute__((vector_size(kVectorBytes), aligned(alignof(acc_t))));
  return *reinterpret_cast<const volatile unaligned_t*>(src);
}

template <typename acc_t>
REFT_ROW_INLINE void store_vec(acc_t* dst, vec_t<acc_t> v) {
  std::memcpy(dst, &v, sizeof(v));
}

// The lanes' sum in sum_lanes's fixed pairwise order.
template <typename acc_t>
REFT_ROW_INLINE acc_t reduce_vec(vec_t<acc_t> v) {
  acc_t lane[Vec<acc_t>::kLanes];
  store_vec(lane, v);
  return sum_lanes<Vec<acc_t>::kLanes>(lane);
}

}  // namespace reft_ext
