// group_norm_silu's CPU kernels compiled for AVX2 + FMA (+ F16C for float16), chosen at run time by
// group_norm_silu.cpp when at::get_cpu_capability() is AVX2 or AVX512: the kernels of
// group_norm_silu_kernels.h with at::vec's AVX2 Vectorized (8 floats a vector, Sleef's vectorised exp).
//
// setup.py compiles every file with the same flags (no -mavx2, so that the extension loads on any x86-64
// CPU); `#pragma GCC target` turns AVX2 on for the functions defined below it instead. That pragma does
// not define the feature macros which the Sleef declarations in torch's headers test, so they are defined
// here by hand, as -mavx2 -mfma -mf16c would. The headers whose inline functions other files share
// (c10, the standard library) are included first, before the pragma, so their out-of-line copies stay
// baseline code; the kernels themselves have internal linkage or are explicit instantiations in their own
// namespace-distinct class, Kernels<Capability::kAVX2, T>.
#include "group_norm_silu.h"

#if FASTDDPM_GROUP_NORM_SILU_AVX2

#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <ostream>
#include <type_traits>

#pragma GCC target("avx2,fma,f16c")
// GCC does not carry the target pragma into lambdas, and warns that the __m256-returning lambdas in torch's
// Vectorized<BFloat16> operators change the ABI; the kernels never call those operators.
#pragma GCC diagnostic ignored "-Wpsabi"
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include "group_norm_silu_kernels.h"

namespace fastddpm::cpu::group_norm_silu_kernels {

template struct Kernels<Capability::kAVX2, float>;
template struct Kernels<Capability::kAVX2, double>;
template struct Kernels<Capability::kAVX2, c10::BFloat16>;
template struct Kernels<Capability::kAVX2, c10::Half>;

}  // namespace fastddpm::cpu::group_norm_silu_kernels

#endif  // FASTDDPM_GROUP_NORM_SILU_AVX2
