// Reverse steps on the CPU: the ancestral DDPM update (Algorithm 2) and the DDIM update (Song et al. eq. 12),
// as kernels/reverse_step.py. Both read the model output and x_t once and write x_{t−1} (and, on request, x̂_0
// and the noise drawn).
//
// p_sample_step reads the stacked [REVERSE_TABLE_ROWS, T] table (rows at t: contracts.h's ROW_*, i.e. √(1/ᾱ),
// √(1/ᾱ − 1), √ᾱ, √(1 − ᾱ), μ̃ coefficient of x̂_0, of x_t, σ_t), ddim_step its first DDIM_TABLE_ROWS; x̂_0
// from the objective, clipped to ±clip or divided by the per-sample threshold_scale s_b after clamping to ±s_b;
// x_{t−1} = μ̃ + σ_t z with no noise where t = 0.
// ddim_step: σ = η √((1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev)) and the other per-sample scalars in float64;
// x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z, ᾱ_prev = final_alpha_cumprod where t_prev < 0.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../contracts.h"
#include "common.h"

namespace fastddpm {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Checks shared by both steps; fills the tensors (batch-outer dense, one layout, one work dtype), the noise
// source and the x̂_0 limit. Returns the timesteps.
std::vector<int64_t> prepare(const char* op, cpu::StepArgs& args, const at::Tensor& model_output,
                             const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& table, int64_t rows,
                             const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
                             int64_t offset, int64_t objective, std::optional<double> clip,
                             const std::optional<at::Tensor>& threshold_scale, bool uses_noise) {
  cpu::check_data(op, x_t, "x_t");
  cpu::check_data(op, model_output, "model_output", &x_t);
  cpu::check_index(op, t, "t", x_t);
  cpu::check_table(op, table, "table", rows);
  TORCH_CHECK(objective == contracts::PRED_NOISE || objective == contracts::PRED_X0 || objective == contracts::PRED_V,
              op, ": objective must be 0 (ε), 1 (x_0) or 2 (v), got ", objective);
  TORCH_CHECK(!clip.has_value() || *clip > 0, op, ": clip must be positive, got ", clip.value_or(0.0));
  if (noise.has_value()) {
    cpu::check_data(op, *noise, "noise", &x_t);
  }
  if (uses_noise) {
    TORCH_CHECK(noise.has_value() != seed.has_value(), op, ": give exactly one of noise and seed");
  }
  if (seed.has_value()) {
    args.noise.seed = cpu::check_seed(op, *seed);
  }
  const int64_t B = x_t.size(0);
  if (threshold_scale.has_value()) {
    cpu::check_cpu(op, *threshold_scale, "threshold_scale");
    TORCH_CHECK(threshold_scale->is_floating_point() && threshold_scale->dim() == 1 && threshold_scale->size(0) == B,
                op, ": threshold_scale must be a float tensor of shape [", B, "], got ",
                threshold_scale->scalar_type(), " ", threshold_scale->sizes());
  }
  const std::vector<int64_t> ts = cpu::timesteps(op, t, "t", table.size(1));
  args.objective = static_cast<int>(objective);
  args.r0 = cpu::gather(table, contracts::ROW_SQRT_RECIP_AC, ts);
  args.r1 = cpu::gather(table, contracts::ROW_SQRT_RECIPM1_AC, ts);
  args.r2 = cpu::gather(table, contracts::ROW_SQRT_AC, ts);
  args.r3 = cpu::gather(table, contracts::ROW_SQRT_1M_AC, ts);
  // x̂_0 → clamp(x̂_0, −s_b, s_b) / s_b (dynamic threshold, s_b rounded to float as the kernels read it), or
  // clamp to ±clip, or as is
  args.limit.assign(B, std::numeric_limits<double>::infinity());
  args.divisor.assign(B, 1.0);
  if (threshold_scale.has_value()) {
    const at::Tensor s = threshold_scale->to(at::kDouble).contiguous();
    for (int64_t b = 0; b < B; ++b) {
      const double s_b = s.const_data_ptr<double>()[b];
      TORCH_CHECK(s_b > 0, op, ": threshold_scale must be > 0, got ", s_b, " at sample ", b);  // x̂_0 / s_b
      args.limit[b] = args.divisor[b] = s_b;
    }
  } else if (clip.has_value()) {
    args.limit.assign(B, *clip);
  }
  const at::Tensor* noise_in = uses_noise && noise.has_value() ? &*noise : nullptr;
  const at::Tensor x = cpu::dense(x_t);
  args.x = x.to(cpu::work_dtype(x.scalar_type(), {&model_output, noise_in}));
  args.model_output = cpu::as_layout_of(model_output, args.x);
  args.stochastic = uses_noise;
  args.noise.drawn = uses_noise && !noise.has_value();
  args.noise.offset = offset;
  if (noise_in != nullptr) {
    args.noise.given = cpu::as_layout_of(*noise_in, args.x);
  }
  return ts;
}

// Allocates the outputs (empty_like the dense x_t, as the fake impls) and runs the kernel, in the work dtype
// when the inputs mix dtypes.
Outputs run(cpu::StepArgs& args, const at::Tensor& x_t, bool write_x0, bool write_noise) {
  const at::Tensor x = cpu::dense(x_t);
  Outputs out{at::empty_like(x), write_x0 ? at::empty_like(x) : x.new_empty({0}),
              write_noise ? at::empty_like(x) : x.new_empty({0})};
  const bool same = args.x.scalar_type() == x.scalar_type();
  args.x_prev = same ? std::get<0>(out) : at::empty_like(args.x);
  if (write_x0) {
    args.x0_out = same ? std::get<1>(out) : at::empty_like(args.x);
  }
  if (write_noise) {
    args.noise_out = same ? std::get<2>(out) : at::empty_like(args.x);
  }
  cpu::kernels().step(args);
  if (!same) {
    std::get<0>(out).copy_(args.x_prev);
    if (write_x0) {
      std::get<1>(out).copy_(args.x0_out);
    }
    if (write_noise) {
      std::get<2>(out).copy_(args.noise_out);
    }
  }
  return out;
}

Outputs p_sample_step_cpu(const at::Tensor& model_output, const at::Tensor& x_t, const at::Tensor& t,
                          const at::Tensor& table, const std::optional<at::Tensor>& noise,
                          const std::optional<at::Tensor>& seed, int64_t offset, int64_t objective,
                          std::optional<double> clip, const std::optional<at::Tensor>& threshold_scale, bool write_x0,
                          bool write_noise) {
  constexpr const char* op = "p_sample_step";
  cpu::StepArgs args;
  const std::vector<int64_t> ts = prepare(op, args, model_output, x_t, t, table, contracts::REVERSE_TABLE_ROWS, noise,
                                          seed, offset, objective, clip, threshold_scale, /*uses_noise=*/true);
  args.ddim = false;
  args.c_x0 = cpu::gather(table, contracts::ROW_POSTERIOR_COEF_X0, ts);
  args.c_xt = cpu::gather(table, contracts::ROW_POSTERIOR_COEF_XT, ts);
  args.sigma = cpu::gather(table, contracts::ROW_SIGMA, ts);
  for (size_t b = 0; b < ts.size(); ++b) {
    if (ts[b] == 0) {
      args.sigma[b] = 0.0;  // no noise at the last step
    }
  }
  return run(args, x_t, write_x0, write_noise && !noise.has_value());
}

Outputs ddim_step_cpu(const at::Tensor& model_output, const at::Tensor& x_t, const at::Tensor& t,
                      const at::Tensor& t_prev, const at::Tensor& table, const at::Tensor& alphas_cumprod,
                      const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed, int64_t offset,
                      int64_t objective, double eta, double final_alpha_cumprod, std::optional<double> clip,
                      const std::optional<at::Tensor>& threshold_scale, bool rederive_noise, bool write_x0,
                      bool write_noise) {
  constexpr const char* op = "ddim_step";
  TORCH_CHECK(eta >= 0, op, ": eta must be >= 0, got ", eta);
  TORCH_CHECK(0 <= final_alpha_cumprod && final_alpha_cumprod <= 1, op,
              ": final_alpha_cumprod (ᾱ after the last step) must lie in [0, 1], got ", final_alpha_cumprod);
  const bool stochastic = eta != 0;
  cpu::StepArgs args;
  const std::vector<int64_t> ts = prepare(op, args, model_output, x_t, t, table, contracts::DDIM_TABLE_ROWS, noise,
                                          seed, offset, objective, clip, threshold_scale, stochastic);
  cpu::check_index(op, t_prev, "t_prev", x_t);
  cpu::check_table(op, alphas_cumprod, "alphas_cumprod");
  const int64_t T = table.size(1);
  TORCH_CHECK(alphas_cumprod.size(0) == T, op, ": alphas_cumprod and table must cover the same timesteps, got ",
              alphas_cumprod.size(0), " and ", T);
  const std::vector<int64_t> ts_prev = cpu::timesteps(op, t_prev, "t_prev", T, /*low=*/-1);
  const std::vector<double> ac = cpu::gather(alphas_cumprod, 0, ts);
  const std::vector<double> ac_prev_table = cpu::gather(alphas_cumprod, 0, ts_prev);
  const size_t B = ts.size();
  args.ddim = true;
  args.rederive = rederive_noise && (clip.has_value() || threshold_scale.has_value());
  args.c_x0.resize(B);
  args.c_dir.resize(B);
  args.sigma.resize(B);
  for (size_t b = 0; b < B; ++b) {
    const double ac_prev = ts_prev[b] >= 0 ? ac_prev_table[b] : final_alpha_cumprod;
    const double var = (1.0 - ac_prev) / (1.0 - ac[b]) * (1.0 - ac[b] / ac_prev);
    const double sigma = eta * std::sqrt(std::max(var, 0.0));
    args.sigma[b] = sigma;
    args.c_dir[b] = std::sqrt(std::max(1.0 - ac_prev - sigma * sigma, 0.0));
    args.c_x0[b] = std::sqrt(ac_prev);
  }
  return run(args, x_t, write_x0, write_noise && !noise.has_value() && stochastic);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) {
  m.impl("p_sample_step", &p_sample_step_cpu);
  m.impl("ddim_step", &ddim_step_cpu);
}

}  // namespace fastddpm
