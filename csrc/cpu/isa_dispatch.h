// Run-time choice between builds of a CPU kernel for three instruction sets: portable (any
// x86-64, or any other CPU), AVX2+FMA, and AVX-512 (F, BW, VL: the same 256-bit vectors with 32
// registers instead of 16).
//
// The kernels are memory-bound only when their FMAs are wide, but the library must load on any
// CPU. Each kernel therefore has an entry point per variant, marked with that variant's target,
// whose bodies force-inline the shared row math (REFT_HD / REFT_ROW_INLINE are always_inline on
// the host), so each entry point compiles all of it for its own instruction set.
// isa_variant<&f>() builds the entry points of f and picks one; isa_variant<&f, &g>() runs g in
// the AVX-512 entry (a register tiling that needs 32 registers) and f in the others.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <iterator>

#define REFT_ROW_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__)
#define REFT_HAS_X86_VARIANTS 1
#define REFT_AVX2_FMA __attribute__((target("avx2,fma")))
#define REFT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#else
// Elsewhere the "avx2" and "avx512" entry points are more portable builds, never chosen.
#define REFT_AVX2_FMA
#define REFT_AVX512
#endif

namespace reft_ext {

// The variants, in increasing order of what they need from the CPU.
enum class CpuKernels { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The names REFT_EXT_CPU_KERNELS and reft_ext.cpu_kernels() use, by CpuKernels value.
inline constexpr const char* kCpuKernelNames[] = {"portable", "avx2", "avx512"};

// The most capable variant this CPU (and this build) can run.
inline CpuKernels best_cpu_kernels() {
#if defined(REFT_HAS_X86_VARIANTS)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
    return CpuKernels::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuKernels::kAvx2;
#endif
  return CpuKernels::kPortable;
}

// The variant every kernel of this process runs: the best one, or at most the one named by
// REFT_EXT_CPU_KERNELS (portable, avx2 or avx512; read once per process), which the tests use to
// check the code path of CPUs with less than this one. An unknown name is an error at first use.
inline CpuKernels chosen_cpu_kernels() {
  static const CpuKernels chosen = [] {
    const CpuKernels best = best_cpu_kernels();
    const char* cap = std::getenv("REFT_EXT_CPU_KERNELS");
    if (cap == nullptr || *cap == '\0') return best;
    for (int v = 0; v < static_cast<int>(std::size(kCpuKernelNames)); ++v) {
      if (std::strcmp(cap, kCpuKernelNames[v]) == 0) {
        return static_cast<int>(best) < v ? best : static_cast<CpuKernels>(v);
      }
    }
    TORCH_CHECK(false, "REFT_EXT_CPU_KERNELS must be portable, avx2 or avx512 (or unset), got '",
                cap, "'");
  }();
  return chosen;
}

// The entry points of Fn (and Wide, for AVX-512): force-inlined functions of one signature.
template <auto Fn, auto Wide = Fn, typename Signature = decltype(Fn)>
struct IsaEntries;
template <auto Fn, auto Wide, typename Result, typename... Args>
struct IsaEntries<Fn, Wide, Result (*)(Args...)> {
  static Result portable(Args... args) { return Fn(args...); }
  REFT_AVX2_FMA static Result avx2(Args... args) { return Fn(args...); }
  REFT_AVX512 static Result avx512(Args... args) { return Wide(args...); }
};

// Fn's entry point for this process's variant: isa_variant<&forward_rows<float>>()(args, ...).
template <auto Fn, auto Wide = Fn>
auto isa_variant() {
  using Entries = IsaEntries<Fn, Wide>;
  switch (chosen_cpu_kernels()) {
    case CpuKernels::kAvx512:
      return &Entries::avx512;
    case CpuKernels::kAvx2:
      return &Entries::avx2;
    default:
      return &Entries::portable;
  }
}

}  // namespace reft_ext
