// GroupNorm + SiLU on the CPU: what the op file (group_norm_silu.cpp) and the kernel files share.
//
// The kernels (group_norm_silu_kernels.h) are compiled twice: for any x86-64/ARM CPU in group_norm_silu.cpp
// (at::vec's DEFAULT capability), and with AVX2+FMA in group_norm_silu_avx2.cpp; the op picks one at run
// time from at::get_cpu_capability(), which ATEN_CPU_CAPABILITY=default overrides, as for ATen's kernels.
// Each kernel works on a range [begin, end) of fixed tasks (a group, or a chunk of rows) on raw pointers;
// the op splits tasks over threads with at::parallel_for, so results never depend on the thread count.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

// The AVX2 copy needs GCC's `#pragma GCC target` on x86-64 (see group_norm_silu_avx2.cpp).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTDDPM_GROUP_NORM_SILU_AVX2 1
#else
#define FASTDDPM_GROUP_NORM_SILU_AVX2 0
#endif

namespace fastddpm::cpu::group_norm_silu_kernels {

// The math type of a storage type: double for double, float for float, bfloat16 and half.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// x viewed as [N, C, HW], C = G * D channels in G groups of D, M = D * HW elements per (sample, group).
struct Shape {
  int64_t N, C, G, HW;
  int64_t D() const { return C / G; }
  int64_t M() const { return C / G * HW; }
};

// Moments of a set of values, {count, mean, m2 = Σ (v − mean)²}, combined with Chan et al.'s formula.
struct Moments {
  double count = 0, mean = 0, m2 = 0;
  void add(double n_b, double mean_b, double m2_b) {
    if (n_b == 0) {
      return;
    }
    const double n = count + n_b, delta = mean_b - mean;
    mean += delta * (n_b / n);
    m2 += m2_b + delta * delta * (count * n_b / n);
    count = n;
  }
};

// The kernels, one copy per CPU capability: declared here, defined in group_norm_silu_kernels.h and
// instantiated in group_norm_silu_default.cpp and group_norm_silu_avx2.cpp. gamma and beta are [C] (ones
// and zeros when the op has no weight or bias); per-(sample, channel) arrays are [N * C]; the NHWC kernels
// take tasks (n, k) = chunk k of `rows` spatial positions of sample n, numbered n * chunks + k.
enum class Capability { kDefault, kAVX2 };

// What a backward kernel forms dz = dy * SiLU'(z) from, besides dy and x (z is recomputed from x, mean, rstd,
// gamma and beta as in the forward):
//   kRecompute  σ(z) evaluated again (exp and a division per element);
//   kSiluGrad   `saved` = SiLU'(z) kept by the training forward (acc type, the kernels' layout of x);
//   kOutput     `saved` = the forward's output y = z σ(z) itself (T = acc: float32 and float64 only), from
//               which σ = y / z (one division) and SiLU' = σ + y (1 − σ).
enum class Saved { kRecompute, kSiluGrad, kOutput };

template <Capability cap, typename T>
struct Kernels {
  using acc = acc_t<T>;

  // NCHW forward, tasks = groups n * G + g (contiguous blocks of M elements): statistics, then
  // y = SiLU((x − mean) * scale + beta[c]) with scale = rstd * gamma[c]. (Subtracting the mean first, rather
  // than folding it into a shift, keeps z exact where x == mean: a constant group gives z = beta.)
  // g, when not null, receives dSiLU/dz at each element (x's layout, acc type): the training forward saves
  // it so that the backward's dz = dy * g needs no σ.
  static void forward_nchw(const T* x, T* y, acc* g, acc* mean, acc* rstd, const acc* gamma, const acc* beta,
                           const Shape& s, double eps, int64_t begin, int64_t end);
  // NHWC forward, pass 1: moments[(task * G + g) * 2 + {0, 1}] = {mean, m2} of group g in the chunk.
  static void forward_nhwc_moments(const T* x, double* moments, const Shape& s, int64_t rows, int64_t begin,
                                   int64_t end);
  // NHWC forward, pass 2: y = SiLU((x − mean[n, c]) * scale[n, c] + beta[c]).
  static void forward_nhwc_apply(const T* x, T* y, acc* g, const acc* mean, const acc* scale, const acc* beta,
                                 const Shape& s, int64_t rows, int64_t begin, int64_t end);

  // The backward kernels read `saved` as `kind` says (null for Saved::kRecompute).
  // NCHW backward, tasks = groups: dz = dy * SiLU'(z), sum_dz[n * C + c] = Σ dz and
  // sum_dz_xhat[n * C + c] = Σ dz * x̂ over the channel, then dx of the whole group.
  static void backward_nchw(const T* dy, const T* x, const acc* saved, Saved kind, const acc* mean,
                            const acc* rstd, const acc* gamma, const acc* beta, T* dx, double* sum_dz,
                            double* sum_dz_xhat, const Shape& s, int64_t begin, int64_t end);
  // NHWC backward, pass 1: sums[(task * C + c) * 2 + {0, 1}] = {Σ dz, Σ dz * (x − mean[n, c])} over the
  // chunk's rows, with z = (x − mean[n, c]) * scale[n, c] + beta[c], scale = rstd * gamma.
  static void backward_nhwc_sums(const T* dy, const T* x, const acc* saved, Saved kind, const acc* mean,
                                 const acc* scale, const acc* beta, double* sums, const Shape& s, int64_t rows,
                                 int64_t begin, int64_t end);
  // NHWC backward, pass 2: dx = scale[n, c] * dz + coef_xd[n, c] * (x − mean[n, c]) + coef_one[n, c].
  static void backward_nhwc_apply(const T* dy, const T* x, const acc* saved, Saved kind, const acc* mean,
                                  const acc* scale, const acc* beta, const acc* coef_xd, const acc* coef_one, T* dx,
                                  const Shape& s, int64_t rows, int64_t begin, int64_t end);
};

}  // namespace fastddpm::cpu::group_norm_silu_kernels
