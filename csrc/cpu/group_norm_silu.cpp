// group_norm_silu on the CPU: y = SiLU(GroupNorm(x; num_groups, weight, bias, eps)) and its backward.
//
// This file checks the arguments, picks the layout and the CPU capability, splits the work into fixed
// tasks over threads (at::parallel_for) and combines the per-task partial results in a fixed order, so
// results are bit-identical whatever the thread count. The kernels: group_norm_silu_kernels.h.
//
// Layouts, x viewed as [N, C, HW] (HW = product of the spatial sizes, 1 for a 2-D x):
//   NCHW (contiguous): a group is one contiguous block of M = C/G * HW elements; one task per (n, g)
//     reads it once from memory for its statistics (two-pass over L1-sized blocks), then again from cache
//     to write y; the backward keeps dz in a per-thread buffer between its two passes.
//   NHWC (channels-last: C innermost, e.g. channels_last / channels_last_3d): tasks are chunks of rows of
//     one sample; pass 1 writes per-chunk moments (or backward sums), which are combined per (n, g), pass 2
//     writes y (or dx). A 2-D x, or HW = 1, is both layouts; it takes the NHWC kernels, vectorised over C.
//   Anything else (a non-contiguous view) is copied to NCHW first; y and dx then get empty_like(x)'s
//   layout, as the op's fake implementation says, through a copy.
// Statistics: fp32 (fp64 for fp64 x), mean and rstd = 1 / sqrt(var + eps) with the biased variance.
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "group_norm_silu.h"

namespace fastddpm {
namespace {

using cpu::group_norm_silu_kernels::acc_t;
using cpu::group_norm_silu_kernels::Capability;
using cpu::group_norm_silu_kernels::Kernels;
using cpu::group_norm_silu_kernels::Moments;
using cpu::group_norm_silu_kernels::Saved;
using cpu::group_norm_silu_kernels::Shape;

// NHWC tasks: chunks of about this many elements (whole rows of C); a chunk's two passes stay in L1/L2.
constexpr int64_t kChunkElements = 4096;
// Fewest elements worth a thread.
constexpr int64_t kGrainElements = 16384;

bool use_avx2() {
#if FASTDDPM_GROUP_NORM_SILU_AVX2
  // ATen's own choice for its kernels (ATEN_CPU_CAPABILITY=default turns it down), and the CPU's flags.
  static const bool avx2 = [] {
    const std::string cap = at::get_cpu_capability();
    return (cap == "AVX2" || cap == "AVX512") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return avx2;
#else
  return false;
#endif
}

bool is_reduced(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf;
}

// Statistics dtype: float32, float64 for float64 x.
at::ScalarType stat_dtype(at::ScalarType x) {
  return x == at::kDouble ? at::kDouble : at::kFloat;
}

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor here, got one on ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || is_reduced(t), op,
              ": x must be a floating-point tensor (float32, float64, bfloat16 or float16), got ", t);
  TORCH_CHECK(x.dim() >= 2, op, ": x must have at least 2 dimensions [N, C, *], got shape ", x.sizes());
}

void check_groups(const at::Tensor& x, int64_t num_groups, const char* op) {
  TORCH_CHECK(num_groups > 0, op, ": num_groups must be positive, got ", num_groups);
  TORCH_CHECK(x.size(1) % num_groups == 0, op, ": number of channels C = ", x.size(1),
              " (x.shape[1]) must be divisible by num_groups = ", num_groups);
}

// weight or bias: 1-D [C] on the CPU, in x's dtype (or float32 for a bfloat16/float16 x, as F.group_norm).
void check_param(const std::optional<at::Tensor>& p, const char* name, const at::Tensor& x, const char* op) {
  if (!p.has_value() || !p->defined()) {
    return;
  }
  TORCH_CHECK(p->device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
              p->device());
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), op, ": ", name, " must be 1-D of size C = ", x.size(1),
              " (x.shape[1]), got shape ", p->sizes());
  const auto t = p->scalar_type();
  TORCH_CHECK(t == x.scalar_type() || (t == at::kFloat && is_reduced(x.scalar_type())), op, ": ", name,
              " dtype ", t, " does not match x dtype ", x.scalar_type(),
              " (a float32 weight/bias is also accepted for a bfloat16 or float16 x)");
}

bool has(const std::optional<at::Tensor>& p) {
  return p.has_value() && p->defined();
}

void check_params(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& x, const char* op) {
  check_param(weight, "weight", x, op);
  check_param(bias, "bias", x, op);
  TORCH_CHECK(!has(weight) || !has(bias) || weight->scalar_type() == bias->scalar_type(), op,
              ": weight and bias must have the same dtype, got ", weight->scalar_type(), " and ",
              bias->scalar_type());
}

// gamma or beta as a [C] array of the math type; `fill` when the op has no weight (1) or bias (0).
template <typename A>
std::vector<A> affine(const std::optional<at::Tensor>& p, int64_t C, A fill) {
  std::vector<A> out(C, fill);
  if (has(p)) {
    const at::Tensor v = p->to(std::is_same_v<A, double> ? at::kDouble : at::kFloat).contiguous();
    std::copy(v.const_data_ptr<A>(), v.const_data_ptr<A>() + C, out.begin());
  }
  return out;
}

Shape shape_of(const at::Tensor& x, int64_t num_groups) {
  const int64_t N = x.size(0), C = x.size(1);
  return {N, C, num_groups, N * C == 0 ? 0 : x.numel() / (N * C)};
}

// Whether t's memory is [N, C, HW] (NCHW) or [N, HW, C] (NHWC) row-major.
bool in_layout(const at::Tensor& t, bool nhwc) {
  return nhwc ? t.movedim(1, -1).is_contiguous() : t.is_contiguous();
}

// The tensor the kernels read (x itself when it is NCHW or NHWC, else a contiguous copy) and its layout.
std::pair<at::Tensor, bool> kernel_input(const at::Tensor& x, const Shape& s) {
  if (x.is_contiguous()) {
    return {x, s.HW == 1};
  }
  if (in_layout(x, true)) {
    return {x, true};
  }
  const at::Tensor xc = x.contiguous();
  return {xc, s.HW == 1};
}

// NHWC tasks: `rows` spatial positions per chunk, fixed by the shape alone.
int64_t rows_per_chunk(const Shape& s) {
  return std::clamp<int64_t>(kChunkElements / std::max<int64_t>(s.C, 1), 1, std::max<int64_t>(s.HW, 1));
}

int64_t grain(int64_t elements_per_task) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(elements_per_task, 1));
}

template <Capability cap, typename T>
void forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& g, const at::Tensor& mean,
             const at::Tensor& rstd,
             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const Shape& s,
             double eps, bool nhwc) {
  using K = Kernels<cap, T>;
  using acc = acc_t<T>;
  const std::vector<acc> gamma = affine<acc>(weight, s.C, 1), beta = affine<acc>(bias, s.C, 0);
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  acc* gp = g.defined() ? g.mutable_data_ptr<acc>() : nullptr;
  acc* mp = mean.mutable_data_ptr<acc>();
  acc* rp = rstd.mutable_data_ptr<acc>();
  if (!nhwc) {
    at::parallel_for(0, s.N * s.G, grain(s.M()), [&](int64_t begin, int64_t end) {
      K::forward_nchw(xp, yp, gp, mp, rp, gamma.data(), beta.data(), s, eps, begin, end);
    });
    return;
  }
  const int64_t rows = rows_per_chunk(s), chunks = (s.HW + rows - 1) / rows, tasks = s.N * chunks;
  std::vector<double> moments(tasks * s.G * 2);
  at::parallel_for(0, tasks, grain(rows * s.C), [&](int64_t begin, int64_t end) {
    K::forward_nhwc_moments(xp, moments.data(), s, rows, begin, end);
  });
  // Per (n, g): the chunks' moments combined in chunk order; then per (n, c) mean and scale = rstd gamma.
  const int64_t D = s.D();
  std::vector<acc> mean_nc(s.N * s.C), scale(s.N * s.C);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t g = 0; g < s.G; ++g) {
      Moments m;
      for (int64_t k = 0; k < chunks; ++k) {
        const double* p = moments.data() + ((n * chunks + k) * s.G + g) * 2;
        m.add(static_cast<double>(std::min(rows, s.HW - k * rows) * D), p[0], p[1]);
      }
      const acc mu = static_cast<acc>(m.mean), rs = static_cast<acc>(1.0 / std::sqrt(m.m2 / s.M() + eps));
      mp[n * s.G + g] = mu;
      rp[n * s.G + g] = rs;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        mean_nc[n * s.C + c] = mu;
        scale[n * s.C + c] = rs * gamma[c];
      }
    }
  }
  at::parallel_for(0, tasks, grain(rows * s.C), [&](int64_t begin, int64_t end) {
    K::forward_nhwc_apply(xp, yp, gp, mean_nc.data(), scale.data(), beta.data(), s, rows, begin, end);
  });
}

// The [0] tensor the forward returns for a silu_grad not asked for: allocated without a trip through the
// dispatcher (at::empty's), as it is on every call of a network's forward.
at::Tensor no_silu_grad(at::ScalarType dtype) {
  return at::detail::empty_cpu({0}, dtype);
}

// The forward op: (y, mean, rstd, silu_grad), silu_grad = dSiLU/dz (in the kernels' layout of x, which the
// backward reads it in; the statistics' dtype) when save_silu_grad, else empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_forward_cpu(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool save_silu_grad) {
  constexpr const char* op = "group_norm_silu";
  check_x(x, op);
  check_groups(x, num_groups, op);
  check_params(weight, bias, x, op);
  const Shape s = shape_of(x, num_groups);
  const auto stat_options = x.options().dtype(stat_dtype(x.scalar_type()));
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({s.N, s.G}, stat_options), rstd = at::empty({s.N, s.G}, stat_options);
  if (s.N * s.G == 0 || s.HW == 0) {
    if (s.N * s.G != 0) {  // empty groups: mean 0 and rstd NaN, as aten::native_group_norm
      mean.fill_(0);
      rstd.fill_(NAN);
    }
    return {y, mean, rstd,
            save_silu_grad ? at::empty_like(x, stat_options) : no_silu_grad(stat_dtype(x.scalar_type()))};
  }
  const auto [xk, nhwc] = kernel_input(x, s);
  const bool direct = in_layout(y, nhwc);
  at::Tensor yk = direct ? y : at::empty_like(xk);
  const at::Tensor g = save_silu_grad ? at::empty_like(xk, stat_options) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_silu_cpu", [&] {
    if (use_avx2()) {
      forward<Capability::kAVX2, scalar_t>(xk, yk, g, mean, rstd, weight, bias, s, eps, nhwc);
    } else {
      forward<Capability::kDefault, scalar_t>(xk, yk, g, mean, rstd, weight, bias, s, eps, nhwc);
    }
  });
  if (!direct) {
    y.copy_(yk);
  }
  return {y, mean, rstd, save_silu_grad ? g : no_silu_grad(stat_dtype(x.scalar_type()))};
}

template <Capability cap, typename T>
void backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& saved, Saved kind, const at::Tensor& mean,
              const at::Tensor& rstd,
              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& dx,
              std::vector<double>& sum_dz, std::vector<double>& sum_dz_xhat, const Shape& s, bool nhwc) {
  using K = Kernels<cap, T>;
  using acc = acc_t<T>;
  const std::vector<acc> gamma = affine<acc>(weight, s.C, 1), beta = affine<acc>(bias, s.C, 0);
  const T* dyp = dy.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const acc* sp = kind == Saved::kRecompute ? nullptr : saved.const_data_ptr<acc>();
  const acc* mp = mean.const_data_ptr<acc>();
  const acc* rp = rstd.const_data_ptr<acc>();
  T* dxp = dx.mutable_data_ptr<T>();
  if (!nhwc) {
    at::parallel_for(0, s.N * s.G, grain(s.M()), [&](int64_t begin, int64_t end) {
      K::backward_nchw(dyp, xp, sp, kind, mp, rp, gamma.data(), beta.data(), dxp, sum_dz.data(), sum_dz_xhat.data(),
                       s, begin, end);
    });
    return;
  }
  const int64_t D = s.D(), rows = rows_per_chunk(s), chunks = (s.HW + rows - 1) / rows, tasks = s.N * chunks;
  // z = (x − mean) * scale + beta, scale = rstd * gamma, with the group statistics spread per (n, c).
  std::vector<acc> mean_nc(s.N * s.C), scale(s.N * s.C);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t c = 0; c < s.C; ++c) {
      mean_nc[n * s.C + c] = mp[n * s.G + c / D];
      scale[n * s.C + c] = rp[n * s.G + c / D] * gamma[c];
    }
  }
  std::vector<double> sums(tasks * s.C * 2);
  at::parallel_for(0, tasks, grain(rows * s.C), [&](int64_t begin, int64_t end) {
    K::backward_nhwc_sums(dyp, xp, sp, kind, mean_nc.data(), scale.data(), beta.data(), sums.data(), s, rows, begin,
                          end);
  });
  // Per (n, c): the chunks' sums in chunk order (Σ dz x̂ = rstd Σ dz (x − mean)); per (n, g): A = Σ gamma dz,
  // B = Σ gamma dz x̂; then the coefficients of dx = rstd gamma dz + (x − mean) (−rstd² B / M) + (−rstd A / M),
  // as in the NCHW kernel.
  std::vector<acc> coef_xd(s.N * s.C), coef_one(s.N * s.C);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t g = 0; g < s.G; ++g) {
      const acc rs = rp[n * s.G + g];
      double A = 0, B = 0;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        double a = 0, b = 0;
        for (int64_t k = 0; k < chunks; ++k) {
          a += sums[((n * chunks + k) * s.C + c) * 2];
          b += sums[((n * chunks + k) * s.C + c) * 2 + 1];
        }
        sum_dz[n * s.C + c] = a;
        sum_dz_xhat[n * s.C + c] = rs * b;
        A += gamma[c] * a;
        B += gamma[c] * (rs * b);
      }
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        coef_xd[n * s.C + c] = static_cast<acc>(-rs * (rs * B) / s.M());
        coef_one[n * s.C + c] = static_cast<acc>(-rs * A / s.M());
      }
    }
  }
  at::parallel_for(0, tasks, grain(rows * s.C), [&](int64_t begin, int64_t end) {
    K::backward_nhwc_apply(dyp, xp, sp, kind, mean_nc.data(), scale.data(), beta.data(), coef_xd.data(),
                           coef_one.data(), dxp, s, rows, begin, end);
  });
}

// grad_weight or grad_bias: Σ over samples of the per-(n, c) sums, in sample order; empty without a parameter.
at::Tensor param_grad(const std::optional<at::Tensor>& p, const std::vector<double>& per_sample, const Shape& s,
                      const at::Tensor& x) {
  if (!has(p)) {
    return at::empty({0}, x.options());
  }
  at::Tensor out = at::empty({s.C}, x.options().dtype(at::kDouble));
  double* o = out.mutable_data_ptr<double>();
  for (int64_t c = 0; c < s.C; ++c) {
    double total = 0;
    for (int64_t n = 0; n < s.N; ++n) {
      total += per_sample[n * s.C + c];
    }
    o[c] = total;
  }
  return out.to(p->scalar_type());
}

void check_stat(const at::Tensor& t, const char* name, const at::Tensor& x, const Shape& s, const char* op) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == stat_dtype(x.scalar_type()), op, ": ", name, " must be ",
              stat_dtype(x.scalar_type()), " for a ", x.scalar_type(), " x, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == s.N && t.size(1) == s.G, op, ": ", name,
              " must have shape [N, num_groups] = [", s.N, ", ", s.G, "], got ", t.sizes());
}

// The backward op. What SiLU'(z) is formed from (Saved in group_norm_silu.h): silu_grad when given, else y when
// given, else σ(z) recomputed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t num_groups,
    const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& silu_grad) {
  constexpr const char* op = "group_norm_silu_backward";
  check_x(x, op);
  check_groups(x, num_groups, op);
  check_params(weight, bias, x, op);
  TORCH_CHECK(grad_y.device() == x.device(), op, ": grad_y must be on x's device ", x.device(), ", got ",
              grad_y.device());
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y shape ", grad_y.sizes(), " must match x shape ",
              x.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y dtype ", grad_y.scalar_type(),
              " must match x dtype ", x.scalar_type());
  TORCH_CHECK(!(has(y) && has(silu_grad)), op, ": pass y or silu_grad (what the forward saved), not both");
  const Shape s = shape_of(x, num_groups);
  check_stat(mean, "mean", x, s, op);
  check_stat(rstd, "rstd", x, s, op);
  const Saved kind = has(silu_grad) ? Saved::kSiluGrad : has(y) ? Saved::kOutput : Saved::kRecompute;
  const at::Tensor saved = has(silu_grad) ? *silu_grad : has(y) ? *y : at::Tensor();
  if (kind == Saved::kOutput) {
    // σ = y / z holds y's precision: a bfloat16/float16 y would give SiLU' to 8-11 bits (the forward's
    // save_silu_grad saves a float32 SiLU' for those dtypes instead).
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                ": a y argument needs a float32 or float64 x (a reduced-precision y holds too few bits of SiLU'; "
                "group_norm_silu(..., save_silu_grad=True) saves silu_grad for it), got ", x.scalar_type());
  }
  if (kind != Saved::kRecompute) {
    const char* name = kind == Saved::kOutput ? "y" : "silu_grad";
    TORCH_CHECK(saved.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
                saved.device());
    TORCH_CHECK(saved.sizes() == x.sizes(), op, ": ", name, " shape ", saved.sizes(), " must match x shape ",
                x.sizes());
    TORCH_CHECK(saved.scalar_type() == stat_dtype(x.scalar_type()), op, ": ", name, " must be ",
                stat_dtype(x.scalar_type()), " for a ", x.scalar_type(), " x, got ", saved.scalar_type());
  }

  at::Tensor dx = at::empty_like(x);
  std::vector<double> sum_dz(s.N * s.C, 0.0), sum_dz_xhat(s.N * s.C, 0.0);
  if (x.numel() > 0) {
    const auto [xk, nhwc] = kernel_input(x, s);
    const at::Tensor dyk = in_layout(grad_y, nhwc) ? grad_y : at::empty_like(xk).copy_(grad_y);
    const at::Tensor sk = !saved.defined() || saved.strides() == xk.strides()
                              ? saved : at::empty_like(xk, saved.options()).copy_(saved);
    const bool direct = in_layout(dx, nhwc);
    at::Tensor dxk = direct ? dx : at::empty_like(xk);
    const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_silu_backward_cpu", [&] {
      if (use_avx2()) {
        backward<Capability::kAVX2, scalar_t>(dyk, xk, sk, kind, mean_c, rstd_c, weight, bias, dxk, sum_dz,
                                              sum_dz_xhat, s, nhwc);
      } else {
        backward<Capability::kDefault, scalar_t>(dyk, xk, sk, kind, mean_c, rstd_c, weight, bias, dxk, sum_dz,
                                                 sum_dz_xhat, s, nhwc);
      }
    });
    if (!direct) {
      dx.copy_(dxk);
    }
  }
  // dgamma = Σ dz x̂, dbeta = Σ dz (per channel, over samples and positions).
  return {dx, param_grad(weight, sum_dz_xhat, s, x), param_grad(bias, sum_dz, s, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_forward_cpu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

}  // namespace fastddpm
