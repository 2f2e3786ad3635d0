// Run-time choice between a portable build of a CPU kernel and an AVX2+FMA build of the same code.
//
// The kernels are memory-bound only when their FMAs are wide, but the library must load on any
// x86-64. Each kernel therefore has two entry points, one plain and one marked REFT_AVX2_FMA, whose
// bodies force-inline the shared row math (REFT_HD / REFT_ROW_INLINE are always_inline on the
// host), so each entry point compiles all of it for its own instruction set. isa_variant<&f>()
// builds both entry points of f and picks one.
#pragma once

#include <cstdlib>
#include <cstring>

#define REFT_ROW_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__)
#define REFT_HAS_AVX2_VARIANT 1
#define REFT_AVX2_FMA __attribute__((target("avx2,fma")))
#else
#define REFT_AVX2_FMA  // elsewhere the "avx2" entry point is a second portable build, never chosen
#endif

namespace reft_ext {

// REFT_EXT_CPU_KERNELS=portable (read once per process) forces the portable build: the tests use
// it to check the code path of CPUs without AVX2.
inline bool portable_forced() {
  const char* choice = std::getenv("REFT_EXT_CPU_KERNELS");
  return choice != nullptr && std::strcmp(choice, "portable") == 0;
}

// The AVX2+FMA entry point where this CPU has both (and the build has the variant), else portable.
template <typename Fn>
Fn kernel_variant(Fn portable, [[maybe_unused]] Fn avx2) {
#if defined(REFT_HAS_AVX2_VARIANT)
  static const bool has =
      !portable_forced() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has) return avx2;
#endif
  return portable;
}

// The two entry points of Fn (a force-inlined function): the same body, compiled per ISA.
template <auto Fn, typename Signature = decltype(Fn)>
struct IsaEntries;
template <auto Fn, typename Result, typename... Args>
struct IsaEntries<Fn, Result (*)(Args...)> {
  static Result portable(Args... args) { return Fn(args...); }
  REFT_AVX2_FMA static Result avx2(Args... args) { return Fn(args...); }
};

// Fn's entry point for this CPU: isa_variant<&forward_rows<float>>()(args, begin, end).
template <auto Fn>
auto isa_variant() {
  return kernel_variant(&IsaEntries<Fn>::portable, &IsaEntries<Fn>::avx2);
}

}  // namespace reft_ext
