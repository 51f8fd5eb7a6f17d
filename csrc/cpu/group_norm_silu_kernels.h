// The CPU kernels of group_norm_silu, written once against at::vec::Vectorized and compiled once per CPU
// capability: included by exactly one .cpp per capability (group_norm_silu_default.cpp,
// group_norm_silu_avx2.cpp), which defines CPU_CAPABILITY (and CPU_CAPABILITY_AVX2) first, as ATen's own
// kernel files do, and instantiates Kernels<cap, T>. Declarations and task layout: group_norm_silu.h.
//
// Math, per sample n and group g of M = D * HW elements (biased variance, fp32 statistics, fp64 for fp64):
//   mean = Σ x / M,  rstd = 1 / sqrt(Σ (x − mean)² / M + eps),  x̂ = (x − mean) * rstd
//   z = x̂ * gamma[c] + beta[c],  y = SiLU(z) = z * σ(z) = z / (1 + exp(−z))
// Backward, with dz = dy * dSiLU/dz = dy * σ(z) * (1 + z * (1 − σ(z))):
//   dbeta[c] = Σ_{n, hw} dz,  dgamma[c] = Σ_{n, hw} dz * x̂
//   dx = rstd * (gamma[c] * dz − (A + x̂ * B) / M),  A = Σ_group gamma * dz,  B = Σ_group gamma * dz * x̂
// SiLU'(z) = σ(z) (1 + z (1 − σ(z))) comes from σ recomputed, from the training forward's saved SiLU'(z), or from
// the forward's output y = z σ(z) as σ + y (1 − σ) with σ = y / z (see Saved in group_norm_silu.h).
// The kernels work with x − mean rather than x̂ (rstd goes into the per-channel coefficients: one multiply
// less per element): z = (x − mean) * (rstd gamma) + beta, Σ dz x̂ = rstd Σ dz (x − mean).
// Statistics are fixed-order reductions: a corrected two-pass (a shift ≈ mean, then Σ (x − shift) and
// Σ (x − shift)²) over blocks that stay in cache, the blocks combined with Chan et al.'s formula in double;
// the backward's sums accumulate per vector lane in acc for at most kBlock elements, then in double.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "group_norm_silu.h"

namespace fastddpm::cpu::group_norm_silu_kernels {
namespace {  // internal linkage: each capability's copy stays in its own object file

using at::vec::Vectorized;

constexpr int64_t kBlock = 2048;  // elements of one statistics block (8 KB of fp32)
// Groups of at most this many elements prefetch the next group while they compute; beyond it, the group no
// longer stays in L2 between its passes, and a group-ahead prefetch would only evict it.
constexpr int64_t kPrefetchGroup = 16384;
// Groups of at most this many elements (a feature map of 8×8 or smaller, a few channels) are done two loops
// per task: statistics of every group, then outputs (forward_nchw).
constexpr int64_t kSmallGroup = 512;

// A scratch array of acc values; plain new[] rather than std::vector, whose out-of-line members would be
// shared (and maybe AVX2-compiled) across object files.
template <typename A>
struct Scratch {
  explicit Scratch(int64_t n) : data(new A[n]()) {}
  ~Scratch() { delete[] data; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  A* data;
};

// Loads and stores of V = Vectorized<acc>::size() elements of T as one vector of acc; `n < V` variants
// touch the first n elements only (loads fill the rest with zeros).
template <typename T>
struct IO {
  using acc = acc_t<T>;
  using Vec = Vectorized<acc>;
  static constexpr int64_t V = Vec::size();

  static Vec load(const T* p) {
    if constexpr (std::is_same_v<T, acc>) {
      return Vec::loadu(p);
    } else {
      Vec v;
      at::vec::load_to_float<T>(p, v);
      return v;
    }
  }
  static Vec load(const T* p, int64_t n) {
    if (n == V) {
      return load(p);
    }
    if constexpr (std::is_same_v<T, acc>) {
      return Vec::loadu(p, n);
    } else {
      T tmp[V];
      for (int64_t i = 0; i < V; ++i) {
        tmp[i] = i < n ? p[i] : T(0);
      }
      return load(tmp);
    }
  }
  static void store(T* p, const Vec& v, int64_t n = V) {
    if constexpr (std::is_same_v<T, acc>) {
      v.store(p, n);
    } else {
#if defined(CPU_CAPABILITY_AVX2)
      if (n == V) {  // round to nearest even, as c10's conversions do
        __m128i h;
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          h = at::vec::cvtfp32_bf16(__m256(v));
        } else {
          h = at::vec::cvtfp32_fp16(__m256(v));
        }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
        return;
      }
#endif
      __at_align__ acc tmp[V];
      v.store(tmp);
      for (int64_t i = 0; i < n; ++i) {
        p[i] = static_cast<T>(tmp[i]);
      }
    }
  }
  // 2 V elements as two vectors; 16-bit types convert both in one go (one pack instead of two).
  static void load2(const T* p, Vec& a, Vec& b) {
    if constexpr (std::is_same_v<T, acc>) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + V);
    } else {
      at::vec::load_to_float<T>(p, a, b);
    }
  }
  static void store2(T* p, const Vec& a, const Vec& b) {
    if constexpr (std::is_same_v<T, acc>) {
      a.store(p);
      b.store(p + V);
    } else {
      at::vec::convert_from_float<T>(a, b).store(p);
    }
  }
};

// Loads of n <= V elements of an acc array.
template <typename A>
Vectorized<A> load_acc(const A* p, int64_t n) {
  return n == Vectorized<A>::size() ? Vectorized<A>::loadu(p) : Vectorized<A>::loadu(p, n);
}

// The lanes of v summed (a fixed order: results do not depend on where the call runs). AVX2 float: a
// shuffle tree in float (the lanes are float partial sums already); else in double, in lane order.
template <typename A>
double hsum(const Vectorized<A>& v) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
  }
#endif
  __at_align__ A tmp[Vectorized<A>::size()];
  v.store(tmp);
  double s = 0;
  for (int64_t i = 0; i < Vectorized<A>::size(); ++i) {
    s += tmp[i];
  }
  return s;
}

// 1 + exp(−z), the denominator of σ(z) = 1 / (1 + exp(−z)) and of SiLU(z) = z / (1 + exp(−z)).
//   AVX2, float: exp(−z) inline (Sleef's exp, a library call per vector, was the bottleneck), for z clamped
//   to [−88, 87] so that 2^n stays a normal float and 1 + exp(−z) finite (σ then saturates at 6e-39 and
//   1 − 1.6e-38): 2^n · p(−u), n = round(−z / ln 2), u = z + n ln 2 = −r (ln 2 split in two), p the degree-5
//   minimax polynomial of at::vec's exp_u20 (≈ 1e-7 relative), evaluated at −u by flipping the signs of its
//   odd coefficients (no negation of z); n rounded by the 1.5·2^23 shifter, 2^n applied by an integer add to
//   the exponent bits. The callers divide by it: the FMA ports bound these kernels and the divider runs beside
//   them (a reciprocal estimate + Newton step measured no faster, and is less accurate).
//   Elsewhere: at::vec's exp_u20 (std::exp in the DEFAULT capability).
template <typename A>
Vectorized<A> one_plus_exp_neg(const Vectorized<A>& z) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    const __m256 zc = _mm256_max_ps(_mm256_min_ps(z, _mm256_set1_ps(87.f)), _mm256_set1_ps(-88.f));
    const __m256 shifter = _mm256_set1_ps(12582912.f);  // 1.5 · 2^23: t's low bits hold round(−z / ln 2)
    const __m256 t = _mm256_fmadd_ps(zc, _mm256_set1_ps(-1.44269504088896341f), shifter);
    const __m256 n = _mm256_sub_ps(t, shifter);
    __m256 u = _mm256_fmadd_ps(n, _mm256_set1_ps(0.693359375f), zc);
    u = _mm256_fmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), u);
    __m256 p = _mm256_fmadd_ps(u, _mm256_set1_ps(-0.00828929059f), _mm256_set1_ps(0.0418978221f));
    p = _mm256_fmadd_ps(u, p, _mm256_set1_ps(-0.166676521f));
    p = _mm256_fmadd_ps(u, p, _mm256_set1_ps(0.499991506f));
    p = _mm256_fmadd_ps(u, p, _mm256_set1_ps(-0.999999701f));
    p = _mm256_fmadd_ps(u, p, _mm256_set1_ps(1.f));
    const __m256i pow2n = _mm256_slli_epi32(_mm256_castps_si256(t), 23);  // (n + shifter bits) << 23
    const __m256 e = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), pow2n));
    return _mm256_add_ps(_mm256_set1_ps(1.f), e);
  }
#endif
  return Vectorized<A>(1) + z.neg().exp_u20();
}

template <typename A>
Vectorized<A> sigmoid(const Vectorized<A>& z) {
  return Vectorized<A>(1) / one_plus_exp_neg(z);
}

// SiLU(z) = z / (1 + exp(−z)): one rounding (z · σ(z) would take two), and no multiply after the division, which
// is the end of σ's long dependency chain (the shorter chain is the faster forward: benchmarks/RESULTS.md).
template <typename A>
Vectorized<A> silu(const Vectorized<A>& z) {
  return z / one_plus_exp_neg(z);
}

// dy * dSiLU(z)/dz = dy * σ(z) * (1 + z * (1 − σ(z))); 0 where dy is 0.
template <typename A>
Vectorized<A> silu_grad(const Vectorized<A>& dy, const Vectorized<A>& z) {
  const Vectorized<A> one(1);
  const Vectorized<A> sig = sigmoid(z);
  return dy * sig * at::vec::fmadd(z, one - sig, one);
}

// y = SiLU(z) and g = dSiLU/dz = σ(z) + y (1 − σ(z)), one exp for both (the training forward saves g, so that
// the backward needs no σ); y exactly as silu() rounds it.
template <typename A>
void silu_and_grad(const Vectorized<A>& z, Vectorized<A>& y, Vectorized<A>& g) {
  const Vectorized<A> d = one_plus_exp_neg(z);
  const Vectorized<A> sig = Vectorized<A>(1) / d;
  y = z / d;
  g = at::vec::fmadd(y, Vectorized<A>(1) - sig, sig);
}

// dy * SiLU'(z) from the forward's output y = z σ(z): σ = y / z and SiLU' = σ + y (1 − σ), with σ = 1/2 where
// |z| < 1e-20 (y / z is 0/0 at z = 0 and loses bits among the subnormals; σ(z) rounds to 1/2 there anyway).
// y and z are those of the forward (z is recomputed by the same arithmetic), so σ comes back within two
// roundings; where σ(z) saturates (z below −88 or so), y / z returns the forward's saturated σ.
template <typename A>
Vectorized<A> silu_grad_from_output(const Vectorized<A>& dy, const Vectorized<A>& z, const Vectorized<A>& y) {
  const Vectorized<A> sig = Vectorized<A>::blendv(y / z, Vectorized<A>(0.5), z.abs() < Vectorized<A>(1e-20));
  return dy * at::vec::fmadd(y, Vectorized<A>(1) - sig, sig);
}

// dz = dy * SiLU'(z) of one vector, z = xd * scale + beta, from what K says: the vector's k <= V elements of
// SiLU'(z) or y are at saved + i (saved is null for Saved::kRecompute).
template <Saved K, typename A>
Vectorized<A> dz_of(const Vectorized<A>& dy, const Vectorized<A>& xd, const Vectorized<A>& scale,
                    const Vectorized<A>& beta, const A* saved, int64_t i, int64_t k) {
  if constexpr (K == Saved::kSiluGrad) {
    return dy * load_acc(saved + i, k);
  } else if constexpr (K == Saved::kOutput) {
    return silu_grad_from_output(dy, at::vec::fmadd(xd, scale, beta), load_acc(saved + i, k));
  } else {
    return silu_grad(dy, at::vec::fmadd(xd, scale, beta));
  }
}

// fn(std::integral_constant<Saved, K>{}) for K = kind: the backward loops are compiled once per source of SiLU'
// (a switch per vector measured slower).
template <typename Fn>
void with_saved(Saved kind, const Fn& fn) {
  switch (kind) {
    case Saved::kSiluGrad:
      return fn(std::integral_constant<Saved, Saved::kSiluGrad>{});
    case Saved::kOutput:
      return fn(std::integral_constant<Saved, Saved::kOutput>{});
    case Saved::kRecompute:
      break;
  }
  fn(std::integral_constant<Saved, Saved::kRecompute>{});
}

// {count, mean, m2} of n <= kBlock contiguous values, by the corrected two-pass algorithm (Chan, Golub and
// LeVeque 1983): pass 1 sums to a shift c ≈ mean; pass 2 (the block now in L1) sums d = x − c and d², then
// mean = c + Σd / n and m2 = Σd² − (Σd)² / n, so the rounding of pass 1 cancels out.
template <typename T>
Moments block_moments(const T* x, int64_t n) {
  using io = IO<T>;
  using Vec = typename io::Vec;
  using acc = typename io::acc;
  constexpr int64_t V = io::V;
  // Four independent accumulators per sum: the adds' latency, not their throughput, would bound one chain.
  Vec s0(0), s1(0), s2(0), s3(0);
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    Vec x0, x1, x2, x3;
    io::load2(x + i, x0, x1);
    io::load2(x + i + 2 * V, x2, x3);
    s0 += x0;
    s1 += x1;
    s2 += x2;
    s3 += x3;
  }
  for (; i < n; i += V) {
    s0 += io::load(x + i, std::min(V, n - i));  // zero-filled lanes add nothing
  }
  const acc shift = static_cast<acc>(hsum((s0 + s1) + (s2 + s3)) / n);
  const Vec c(shift);
  Vec e0(0), e1(0), e2(0), e3(0), q0(0), q1(0), q2(0), q3(0);
  i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    Vec x0, x1, x2, x3;
    io::load2(x + i, x0, x1);
    io::load2(x + i + 2 * V, x2, x3);
    const Vec d0 = x0 - c, d1 = x1 - c, d2 = x2 - c, d3 = x3 - c;
    e0 += d0;
    e1 += d1;
    e2 += d2;
    e3 += d3;
    q0 = at::vec::fmadd(d0, d0, q0);
    q1 = at::vec::fmadd(d1, d1, q1);
    q2 = at::vec::fmadd(d2, d2, q2);
    q3 = at::vec::fmadd(d3, d3, q3);
  }
  double e = 0, q = 0;
  for (; i < n; ++i) {
    const double d = static_cast<double>(static_cast<acc>(x[i]) - shift);
    e += d;
    q += d * d;
  }
  e += hsum((e0 + e1) + (e2 + e3));
  q += hsum((q0 + q1) + (q2 + q3));
  Moments m;
  m.add(static_cast<double>(n), shift + e / n, std::max(q - e * e / n, 0.0));
  return m;
}

// Asks for the cache line holding p in L2, ahead of its use by the next task: the kernels' compute-heavy
// second passes then overlap the memory reads of the next group.
template <typename T>
inline void prefetch(const T* p) {
  if (p != nullptr) {
    __builtin_prefetch(p, 0, 2);
  }
}

// y[i] = SiLU((x[i] − mean) * scale + shift) for n contiguous values, and g[i] = SiLU' there if g is not
// null; prefetches next[0, n) if not null.
template <typename T>
void silu_affine(const T* x, T* y, acc_t<T>* g, int64_t n, acc_t<T> mean, acc_t<T> scale, acc_t<T> shift,
                 const T* next) {
  using io = IO<T>;
  using Vec = typename io::Vec;
  constexpr int64_t V = io::V;
  const Vec m(mean), a(scale), b(shift);
  int64_t i = 0;
  if (g != nullptr) {
    for (; i + 2 * V <= n; i += 2 * V) {
      prefetch(next == nullptr ? nullptr : next + i);
      Vec x0, x1, y0, y1, g0, g1;
      io::load2(x + i, x0, x1);
      silu_and_grad(at::vec::fmadd(x0 - m, a, b), y0, g0);
      silu_and_grad(at::vec::fmadd(x1 - m, a, b), y1, g1);
      io::store2(y + i, y0, y1);
      g0.store(g + i);
      g1.store(g + i + V);
    }
    for (; i < n; i += V) {
      const int64_t k = std::min(V, n - i);
      Vec yv, gv;
      silu_and_grad(at::vec::fmadd(io::load(x + i, k) - m, a, b), yv, gv);
      io::store(y + i, yv, k);
      gv.store(g + i, k);
    }
    return;
  }
  for (; i + 2 * V <= n; i += 2 * V) {
    prefetch(next == nullptr ? nullptr : next + i);
    Vec x0, x1;
    io::load2(x + i, x0, x1);
    io::store2(y + i, silu(at::vec::fmadd(x0 - m, a, b)), silu(at::vec::fmadd(x1 - m, a, b)));
  }
  for (; i < n; i += V) {
    const int64_t k = std::min(V, n - i);
    prefetch(next == nullptr ? nullptr : next + i);
    io::store(y + i, silu(at::vec::fmadd(io::load(x + i, k) - m, a, b)), k);
  }
}

// Channels-last rows: for the W vectors of channels [c, c + W V) (the last holding k <= V channels) of R rows
// of C values, the corrected two-pass per channel: shift = Σ x / R, then e = Σ (x − shift), q = Σ (x − shift)²,
// stored at [c, c + W V) of the three arrays (lanes past the k channels get 0).
template <int W, typename T>
void column_moments(const T* xs, int64_t C, int64_t R, int64_t c, int64_t k, acc_t<T>* shift, acc_t<T>* e_out,
                    acc_t<T>* q_out) {
  using io = IO<T>;
  using Vec = typename io::Vec;
  constexpr int64_t V = io::V;
  Vec s[W], e[W], q[W];
  for (int j = 0; j < W; ++j) {
    s[j] = e[j] = q[j] = Vec(0);
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int j = 0; j < W; ++j) {
      s[j] += io::load(xs + r * C + c + j * V, j == W - 1 ? k : V);
    }
  }
  const Vec inv_r(static_cast<acc_t<T>>(1.0 / R));
  for (int j = 0; j < W; ++j) {
    s[j] = s[j] * inv_r;
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int j = 0; j < W; ++j) {
      const Vec d = io::load(xs + r * C + c + j * V, j == W - 1 ? k : V) - s[j];
      e[j] += d;
      q[j] = at::vec::fmadd(d, d, q[j]);
    }
  }
  for (int j = 0; j < W; ++j) {
    s[j].store(shift + c + j * V);
    e[j].store(e_out + c + j * V);
    q[j].store(q_out + c + j * V);
  }
}

}  // namespace

template <Capability cap, typename T>
void Kernels<cap, T>::forward_nchw(const T* x, T* y, acc* g, acc* mean, acc* rstd, const acc* gamma,
                                   const acc* beta, const Shape& s, double eps, int64_t begin, int64_t end) {
  const int64_t D = s.D(), HW = s.HW, M = s.M();
  auto statistics = [&](int64_t ng) {
    const T* xg = x + ng * M;
    Moments m;
    for (int64_t lo = 0; lo < M; lo += kBlock) {
      const Moments b = block_moments(xg + lo, std::min(kBlock, M - lo));
      m.add(b.count, b.mean, b.m2);
    }
    mean[ng] = static_cast<acc>(m.mean);
    rstd[ng] = static_cast<acc>(1.0 / std::sqrt(m.m2 / M + eps));
  };
  auto apply = [&](int64_t ng, const T* next) {
    const T* xg = x + ng * M;
    T* yg = y + ng * M;
    const acc mu = mean[ng], rs = rstd[ng];
    const int64_t c0 = (ng % s.G) * D;
    for (int64_t d = 0; d < D; ++d) {
      silu_affine(xg + d * HW, yg + d * HW, g == nullptr ? nullptr : g + ng * M + d * HW, HW, mu,
                  rs * gamma[c0 + d], beta[c0 + d], next == nullptr ? nullptr : next + d * HW);
    }
  };
  if (M <= kSmallGroup) {
    // Small groups: the statistics of all the task's groups first, then their outputs. A group's statistics
    // end in a chain of dependent scalar steps (shift, sums, mean, the float64 divisions and square root of
    // rstd) that one group's few vectors cannot hide; independent groups in a row let the core overlap them.
    // The task's groups stay in cache between the two loops.
    for (int64_t ng = begin; ng < end; ++ng) {
      statistics(ng);
    }
    using io = IO<T>;
    using Vec = typename io::Vec;
    constexpr int64_t V = io::V;
    if (HW % V != 0) {
      for (int64_t ng = begin; ng < end; ++ng) {
        apply(ng, nullptr);
      }
      return;
    }
    // Whole vectors per channel: one loop over the group's vectors (channel coefficients switched every
    // HW / V vectors), so that the σ constants stay in registers across channels.
    for (int64_t ng = begin; ng < end; ++ng) {
      const T* xg = x + ng * M;
      T* yg = y + ng * M;
      acc* gg = g == nullptr ? nullptr : g + ng * M;
      const Vec m(mean[ng]);
      const acc rs = rstd[ng];
      const int64_t c0 = (ng % s.G) * D;
      for (int64_t d = 0; d < D; ++d) {
        const Vec a(rs * gamma[c0 + d]), b(beta[c0 + d]);
        for (int64_t i = d * HW; i < (d + 1) * HW; i += V) {
          const Vec z = at::vec::fmadd(io::load(xg + i) - m, a, b);
          if (gg == nullptr) {
            io::store(yg + i, silu(z));
          } else {
            Vec yv, gv;
            silu_and_grad(z, yv, gv);
            io::store(yg + i, yv);
            gv.store(gg + i);
          }
        }
      }
    }
    return;
  }
  for (int64_t ng = begin; ng < end; ++ng) {
    statistics(ng);
    // The group was just read: its second read, to normalise, comes from cache; meanwhile the next group's
    // lines are asked for.
    apply(ng, ng + 1 < end && M <= kPrefetchGroup ? x + (ng + 1) * M : nullptr);
  }
}

template <Capability cap, typename T>
void Kernels<cap, T>::forward_nhwc_moments(const T* x, double* moments, const Shape& s, int64_t rows,
                                           int64_t begin, int64_t end) {
  using io = IO<T>;
  constexpr int64_t V = io::V;
  const int64_t C = s.C, G = s.G, D = s.D(), HW = s.HW;
  const int64_t chunks = (HW + rows - 1) / rows, Cv = (C + V - 1) / V * V;
  Scratch<acc> sum(Cv), sq(Cv), shift(Cv);  // per channel: Σ (x − shift), Σ (x − shift)², shift
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / chunks, r0 = (task % chunks) * rows, R = std::min(rows, HW - r0);
    const T* xs = x + (n * HW + r0) * C;
    // Per channel, the corrected two-pass of block_moments over the chunk's R rows (the chunk stays in
    // cache), W vectors of channels at a time with their sums in registers.
    int64_t c = 0;
    for (; c + 4 * V <= C; c += 4 * V) {
      column_moments<4>(xs, C, R, c, V, shift.data, sum.data, sq.data);
    }
    for (; c < C; c += V) {
      column_moments<1>(xs, C, R, c, std::min(V, C - c), shift.data, sum.data, sq.data);
    }
    // Each group's D channels of R values: mean of the channel means, m2 = Σ within + Σ between.
    for (int64_t g = 0; g < G; ++g) {
      double gmean = 0;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        gmean += shift.data[c] + static_cast<double>(sum.data[c]) / R;
      }
      gmean /= D;
      double m2 = 0;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        const double e = sum.data[c], cmean = shift.data[c] + e / R;
        m2 += std::max(static_cast<double>(sq.data[c]) - e * e / R, 0.0) + R * (cmean - gmean) * (cmean - gmean);
      }
      moments[(task * G + g) * 2] = gmean;
      moments[(task * G + g) * 2 + 1] = m2;
    }
  }
}

template <Capability cap, typename T>
void Kernels<cap, T>::forward_nhwc_apply(const T* x, T* y, acc* g, const acc* mean, const acc* scale,
                                         const acc* beta, const Shape& s, int64_t rows, int64_t begin,
                                         int64_t end) {
  using io = IO<T>;
  using Vec = typename io::Vec;
  constexpr int64_t V = io::V;
  const int64_t C = s.C, HW = s.HW, chunks = (HW + rows - 1) / rows;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / chunks, r0 = (task % chunks) * rows, R = std::min(rows, HW - r0);
    const acc* m = mean + n * C;
    const acc* a = scale + n * C;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = (n * HW + r0 + r) * C;
      for (int64_t c = 0; c < C; c += V) {
        const int64_t k = std::min(V, C - c);
        const Vec z = at::vec::fmadd(io::load(x + row + c, k) - load_acc(m + c, k), load_acc(a + c, k),
                                     load_acc(beta + c, k));
        if (g == nullptr) {
          io::store(y + row + c, silu(z), k);
        } else {
          Vec yv, gv;
          silu_and_grad(z, yv, gv);
          io::store(y + row + c, yv, k);
          gv.store(g + row + c, k);
        }
      }
    }
  }
}

template <Capability cap, typename T>
void Kernels<cap, T>::backward_nchw(const T* dy, const T* x, const acc* saved, Saved kind, const acc* mean,
                                    const acc* rstd, const acc* gamma, const acc* beta, T* dx, double* sum_dz,
                                    double* sum_dz_xhat, const Shape& s, int64_t begin, int64_t end) {
  using io = IO<T>;
  using Vec = typename io::Vec;
  constexpr int64_t V = io::V;
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  const int64_t C = s.C, D = s.D(), HW = s.HW, M = s.M();
  Scratch<acc> dz_buf(M + V);  // the group's dz, kept (in cache) for the second pass
  with_saved(kind, [&](auto saved_kind) {
    constexpr Saved K = decltype(saved_kind)::value;
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / s.G, c0 = (ng % s.G) * D;
      const acc rs = rstd[ng];
      const Vec mean_v(mean[ng]);
      // Pass 1: dz, and per channel Σ dz and Σ dz x̂ = rstd Σ dz (x − mean); A and B of the group.
      const bool more = ng + 1 < end && M <= kPrefetchGroup;
      double A = 0, B = 0;
      for (int64_t d = 0; d < D; ++d) {
        const T* xr = x + ng * M + d * HW;
        const T* dyr = dy + ng * M + d * HW;
        acc* dzr = dz_buf.data + d * HW;
        const int64_t off = ng * M + d * HW;  // of the channel in x, dy and saved
        const Vec scale_v(rs * gamma[c0 + d]), beta_v(beta[c0 + d]);
        double s_dz = 0, s_dz_xd = 0;
        for (int64_t lo = 0; lo < HW; lo += kBlock) {
          const int64_t hi = std::min(HW, lo + kBlock);
          // Two accumulator pairs (even and odd vectors): one FMA chain would bound the loop by its latency.
          Vec a_dz[2] = {Vec(0), Vec(0)}, a_dz_xd[2] = {Vec(0), Vec(0)};
          auto step = [&](int64_t i, int64_t k, int j) {
            if (more && i % kLine == 0) {  // the next group's x and dy, a cache line each, while this computes
              prefetch(xr + M + i);
              prefetch(dyr + M + i);
            }
            if (K != Saved::kRecompute && more && i % (64 / sizeof(acc)) == 0) {
              prefetch(saved + off + M + i);
            }
            const Vec xd = io::load(xr + i, k) - mean_v;
            const Vec dz = dz_of<K>(io::load(dyr + i, k), xd, scale_v, beta_v, saved, off + i, k);
            dz.store(dzr + i);  // a partial last vector spills into the next channel's slots (or the padding)
            a_dz[j] += dz;
            a_dz_xd[j] = at::vec::fmadd(dz, xd, a_dz_xd[j]);
          };
          int64_t i = lo;
          for (; i + 2 * V <= hi; i += 2 * V) {
            step(i, V, 0);
            step(i + V, V, 1);
          }
          for (; i < hi; i += V) {
            step(i, std::min(V, hi - i), 0);
          }
          s_dz += hsum(a_dz[0] + a_dz[1]);
          s_dz_xd += hsum(a_dz_xd[0] + a_dz_xd[1]);
        }
        sum_dz[n * C + c0 + d] = s_dz;
        sum_dz_xhat[n * C + c0 + d] = rs * s_dz_xd;
        A += gamma[c0 + d] * s_dz;
        B += gamma[c0 + d] * (rs * s_dz_xd);
      }
      // Pass 2: dx = rstd gamma dz + (x − mean) (−rstd² B / M) + (−rstd A / M), x and dz from cache.
      const Vec c_one(static_cast<acc>(-rs * A / M)), c_xd(static_cast<acc>(-rs * (rs * B) / M));
      for (int64_t d = 0; d < D; ++d) {
        const T* xr = x + ng * M + d * HW;
        const acc* dzr = dz_buf.data + d * HW;
        T* dxr = dx + ng * M + d * HW;
        const Vec c_dz(rs * gamma[c0 + d]);
        int64_t i = 0;
        for (; i + 2 * V <= HW; i += 2 * V) {
          Vec x0, x1;
          io::load2(xr + i, x0, x1);
          io::store2(dxr + i, at::vec::fmadd(c_dz, Vec::loadu(dzr + i), at::vec::fmadd(x0 - mean_v, c_xd, c_one)),
                     at::vec::fmadd(c_dz, Vec::loadu(dzr + i + V), at::vec::fmadd(x1 - mean_v, c_xd, c_one)));
        }
        for (; i < HW; i += V) {
          const int64_t k = std::min(V, HW - i);
          const Vec xd = io::load(xr + i, k) - mean_v;
          io::store(dxr + i, at::vec::fmadd(c_dz, Vec::loadu(dzr + i), at::vec::fmadd(xd, c_xd, c_one)), k);
        }
      }
    }
  });
}

template <Capability cap, typename T>
void Kernels<cap, T>::backward_nhwc_sums(const T* dy, const T* x, const acc* saved, Saved kind, const acc* mean,
                                         const acc* scale, const acc* beta, double* sums, const Shape& s,
                                         int64_t rows, int64_t begin, int64_t end) {
  using io = IO<T>;
  using Vec = typename io::Vec;
  constexpr int64_t V = io::V;
  const int64_t C = s.C, HW = s.HW, chunks = (HW + rows - 1) / rows, Cv = (C + V - 1) / V * V;
  Scratch<acc> a_dz(Cv), a_dz_xd(Cv);
  with_saved(kind, [&](auto saved_kind) {
    constexpr Saved K = decltype(saved_kind)::value;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, r0 = (task % chunks) * rows, R = std::min(rows, HW - r0);
      const acc* m = mean + n * C;
      const acc* a = scale + n * C;
      std::fill(a_dz.data, a_dz.data + Cv, acc(0));
      std::fill(a_dz_xd.data, a_dz_xd.data + Cv, acc(0));
      for (int64_t r = 0; r < R; ++r) {
        const int64_t row = (n * HW + r0 + r) * C;
        for (int64_t c = 0; c < C; c += V) {
          const int64_t k = std::min(V, C - c);
          const Vec xd = io::load(x + row + c, k) - load_acc(m + c, k);
          const Vec dz = dz_of<K>(io::load(dy + row + c, k), xd, load_acc(a + c, k),  // 0 in the lanes past C
                               load_acc(beta + c, k), saved, row + c, k);
          (Vec::loadu(a_dz.data + c) + dz).store(a_dz.data + c);
          at::vec::fmadd(dz, xd, Vec::loadu(a_dz_xd.data + c)).store(a_dz_xd.data + c);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        sums[(task * C + c) * 2] = a_dz.data[c];
        sums[(task * C + c) * 2 + 1] = a_dz_xd.data[c];
      }
    }
  });
}

template <Capability cap, typename T>
void Kernels<cap, T>::backward_nhwc_apply(const T* dy, const T* x, const acc* saved, Saved kind,
                                          const acc* mean, const acc* scale, const acc* beta, const acc* coef_xd,
                                          const acc* coef_one, T* dx, const Shape& s, int64_t rows,
                                          int64_t begin, int64_t end) {
  using io = IO<T>;
  using Vec = typename io::Vec;
  constexpr int64_t V = io::V;
  const int64_t C = s.C, HW = s.HW, chunks = (HW + rows - 1) / rows;
  with_saved(kind, [&](auto saved_kind) {
    constexpr Saved K = decltype(saved_kind)::value;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, r0 = (task % chunks) * rows, R = std::min(rows, HW - r0);
      const int64_t nc = n * C;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t row = (n * HW + r0 + r) * C;
        for (int64_t c = 0; c < C; c += V) {
          const int64_t k = std::min(V, C - c);
          const Vec xd = io::load(x + row + c, k) - load_acc(mean + nc + c, k);
          const Vec a = load_acc(scale + nc + c, k);
          const Vec dz = dz_of<K>(io::load(dy + row + c, k), xd, a, load_acc(beta + c, k), saved, row + c, k);
          const Vec rest = at::vec::fmadd(load_acc(coef_xd + nc + c, k), xd, load_acc(coef_one + nc + c, k));
          io::store(dx + row + c, at::vec::fmadd(a, dz, rest), k);
        }
      }
    }
  });
}

}  // namespace fastddpm::cpu::group_norm_silu_kernels
