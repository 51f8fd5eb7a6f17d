// The element kernels of the fused CPU ops (csrc/cpu/fused_kernels.h), built twice: for CPUs with AVX2 and
// FMA (explicit AVX2 Philox / log / sincos, AVX2 element loops) and portable C++ for the others. kernels()
// picks one at run time. Both draw the same stream (within float rounding of log/sin/cos); results never
// depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <utility>
#include <vector>

#include "../contracts.h"
#include "common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTDDPM_HAVE_AVX2_BUILD 1
#include <immintrin.h>
#else
#define FASTDDPM_HAVE_AVX2_BUILD 0
#endif

namespace fastddpm {
namespace cpu {

namespace portable {
#define FASTDDPM_AVX2 0
#include "fused_kernels.h"
#undef FASTDDPM_AVX2
}  // namespace portable

#if FASTDDPM_HAVE_AVX2_BUILD
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// GCC's scheduling before register allocation (off at -O2/-O3 on x86) interleaves the independent log, sincos and
// Philox chains of a draw, with bit-identical outputs (tools/draw_bench.sh times the draw with and without it;
// benchmarks/RESULTS.md has the numbers). Source-level interleaving, Estrin's log and a shorter sincos
// reduction gained less, and nothing on top of it.
#if !defined(__clang__)
#pragma GCC optimize("schedule-insns", "sched-pressure")
#endif
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#endif
namespace avx2 {
#define FASTDDPM_AVX2 1
#include "fused_kernels.h"
#undef FASTDDPM_AVX2
}  // namespace avx2
#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options
#endif

// FASTDDPM_CPU_KERNELS=portable forces the portable build (how the tests exercise it on an AVX2 machine).
const Kernels& kernels() {
#if FASTDDPM_HAVE_AVX2_BUILD
  static const bool use_avx2 = [] {
    const char* forced = std::getenv("FASTDDPM_CPU_KERNELS");
    if (forced != nullptr && std::strcmp(forced, "portable") == 0) {
      return false;
    }
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return use_avx2 ? avx2::table : portable::table;
#else
  return portable::table;
#endif
}

}  // namespace cpu
}  // namespace fastddpm
