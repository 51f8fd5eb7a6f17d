// diffusion_loss on the CPU: L_simple (DDPM eq. 14) with the target formed in-kernel, forward and backward.
//
//   loss[b] = w_b · mean_i (pred[b, i] − target[b, i])²,  target = ε (PRED_NOISE), x_0 (PRED_X0) or
//   v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (PRED_V), ε given or regenerated from the Philox (seed, offset) q_sample
//   drew it with; w_b = 1, or min-SNR-γ from SNR_t = ᾱ_t / (1 − ᾱ_t) on the objective's scale
//   (ε → min(SNR, γ)/SNR, x_0 → min(SNR, γ), v → min(SNR, γ)/(SNR + 1)); REDUCTION_NONE → [B],
//   REDUCTION_MEAN → the mean (the codes of contracts.h).
//   Backward: ∂L/∂pred = g_b · w_b · 2 (pred − target) / N, g_b = grad[b] (none) or grad / B (mean).
//
// The loss is float32 (float64 for float64 pred); per-task partial sums are combined in a fixed order.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "../contracts.h"
#include "common.h"

namespace fastddpm {
namespace {

constexpr const char* kOp = "diffusion_loss";

cpu::LossArgs prepare(const at::Tensor& model_output, const std::optional<at::Tensor>& x_start, const at::Tensor& t,
                      const at::Tensor& sqrt_ac, const at::Tensor& sqrt_1m_ac, const std::optional<at::Tensor>& noise,
                      const std::optional<at::Tensor>& seed, int64_t offset, int64_t objective, int64_t reduction) {
  cpu::check_data(kOp, model_output, "model_output");
  cpu::check_index(kOp, t, "t", model_output);
  cpu::check_table(kOp, sqrt_ac, "sqrt_alphas_cumprod");
  cpu::check_table(kOp, sqrt_1m_ac, "sqrt_one_minus_alphas_cumprod");
  TORCH_CHECK(sqrt_ac.size(0) == sqrt_1m_ac.size(0), kOp,
              ": sqrt_alphas_cumprod and sqrt_one_minus_alphas_cumprod must have the same length");
  TORCH_CHECK(contracts::PRED_NOISE <= objective && objective <= contracts::PRED_V, kOp,
              ": objective must be 0 (ε), 1 (x_0) or 2 (v), got ", objective);
  TORCH_CHECK(reduction == contracts::REDUCTION_NONE || reduction == contracts::REDUCTION_MEAN, kOp,
              ": reduction must be 0 (none) or 1 (mean), got ", reduction);
  TORCH_CHECK(model_output.size(0) > 0, kOp, ": empty batch");
  if (objective != contracts::PRED_NOISE) {
    TORCH_CHECK(x_start.has_value(), kOp, ": the x_0 and v objectives need x_start");
  }
  if (x_start.has_value()) {
    cpu::check_data(kOp, *x_start, "x_start", &model_output);
  }
  if (objective != contracts::PRED_X0) {
    TORCH_CHECK(noise.has_value() != seed.has_value(), kOp, ": give exactly one of noise and seed");
  }
  if (noise.has_value()) {
    cpu::check_data(kOp, *noise, "noise", &model_output);
  }
  cpu::LossArgs args;
  if (seed.has_value()) {
    args.noise.seed = cpu::check_seed(kOp, *seed);
  }
  args.objective = static_cast<int>(objective);
  const std::vector<int64_t> ts = cpu::timesteps(kOp, t, "t", sqrt_ac.size(0));
  args.a = cpu::gather(sqrt_ac, 0, ts);
  args.s = cpu::gather(sqrt_1m_ac, 0, ts);
  // (x_0 and ε only where the objective reads them)
  const at::Tensor* x0_in = x_start.has_value() && objective != contracts::PRED_NOISE ? &*x_start : nullptr;
  const at::Tensor* noise_in = noise.has_value() && objective != contracts::PRED_X0 ? &*noise : nullptr;
  args.pred = cpu::dense(model_output);
  args.pred = args.pred.to(cpu::work_dtype(args.pred.scalar_type(), {x0_in, noise_in}));
  if (x_start.has_value() && objective != contracts::PRED_NOISE) {
    args.x0 = cpu::as_layout_of(*x_start, args.pred);
  }
  if (objective != contracts::PRED_X0) {
    args.noise.drawn = !noise.has_value();
    args.noise.offset = offset;
    if (noise.has_value()) {
      args.noise.given = cpu::as_layout_of(*noise, args.pred);
    }
  }
  return args;
}

// w_b: 1, or min-SNR-γ on the objective's scale.
std::vector<double> weights(const cpu::LossArgs& args, std::optional<double> gamma) {
  std::vector<double> w(args.a.size(), 1.0);
  if (!gamma.has_value()) {
    return w;
  }
  TORCH_CHECK(*gamma > 0, kOp, ": min_snr_gamma must be > 0 (or None), got ", *gamma);
  for (size_t b = 0; b < w.size(); ++b) {
    const double snr = (args.a[b] * args.a[b]) / (args.s[b] * args.s[b]);
    const double clipped = std::min(snr, *gamma);
    w[b] = args.objective == contracts::PRED_NOISE ? clipped / snr
           : args.objective == contracts::PRED_X0  ? clipped
                                                   : clipped / (snr + 1.0);
  }
  return w;
}

at::ScalarType loss_dtype(const at::Tensor& pred) { return pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The reduced loss from the per-sample sums Σ (pred − target)²: w_b · sum_b / N, their mean or [B].
at::Tensor reduce(std::vector<double> per_sample, const std::vector<double>& w, int64_t N, int64_t reduction,
                  const at::Tensor& model_output, const at::TensorOptions& options) {
  const int64_t B = static_cast<int64_t>(per_sample.size());
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    per_sample[b] = w[b] * per_sample[b] / static_cast<double>(N);
    total += per_sample[b];
  }
  if (reduction == contracts::REDUCTION_MEAN) {
    return at::empty({}, options).fill_(total / static_cast<double>(B));
  }
  at::Tensor out = at::empty({B}, options.dtype(at::kDouble));
  std::copy(per_sample.begin(), per_sample.end(), out.mutable_data_ptr<double>());
  return out.to(loss_dtype(model_output));
}

// grad_scale[b] = g_b · w_b · 2 / N for the incoming gradient g (the scalar for mean: g / B each).
std::vector<double> grad_scales(const double* g, const std::vector<double>& w, int64_t N, int64_t reduction) {
  const int64_t B = static_cast<int64_t>(w.size());
  std::vector<double> out(B);
  for (int64_t b = 0; b < B; ++b) {
    const double gb = reduction == contracts::REDUCTION_MEAN ? g[0] / static_cast<double>(B) : g[b];
    out[b] = gb * w[b] * 2.0 / static_cast<double>(N);
  }
  return out;
}

// Runs the kernel `run` (the loss forward, or backward) with args.grad_pred set, and returns the gradient as
// empty_like of the dense model_output (the fake impls' layout) in its dtype; the kernel writes in the work dtype.
template <typename Run>
at::Tensor with_grad_output(cpu::LossArgs& args, const at::Tensor& model_output, const Run& run) {
  at::Tensor grad_pred = at::empty_like(cpu::dense(model_output));
  args.grad_pred = grad_pred.scalar_type() == args.pred.scalar_type() ? grad_pred : at::empty_like(args.pred);
  run();
  if (!args.grad_pred.is_same(grad_pred)) {
    grad_pred.copy_(args.grad_pred);
  }
  return grad_pred;
}

// The forward: (loss, empty), or with keep_grad (the training forward) (loss, g), g = ∂loss/∂model_output
// for an incoming gradient of one (the scalar 1 for mean, ones [B] for none) written by the pass that sums
// the loss, so that the backward only scales it (or, for the usual 1, returns it).
std::tuple<at::Tensor, at::Tensor> diffusion_loss_cpu(
    const at::Tensor& model_output, const std::optional<at::Tensor>& x_start, const at::Tensor& t,
    const at::Tensor& sqrt_ac, const at::Tensor& sqrt_1m_ac, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& seed, int64_t offset, int64_t objective, std::optional<double> min_snr_gamma,
    int64_t reduction, bool keep_grad) {
  cpu::LossArgs args = prepare(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset, objective, reduction);
  const int64_t B = args.pred.size(0), N = args.pred.numel() / B;
  const std::vector<double> w = weights(args, min_snr_gamma);
  const at::TensorOptions loss_options = args.pred.options().dtype(loss_dtype(model_output));
  if (!keep_grad) {
    std::vector<double> per_sample = N == 0 ? std::vector<double>(B, 0.0) : cpu::kernels().loss_forward(args);
    return {reduce(std::move(per_sample), w, N, reduction, model_output, loss_options),
            model_output.new_empty({0})};
  }
  const std::vector<double> ones(reduction == contracts::REDUCTION_MEAN ? 1 : B, 1.0);
  args.grad_scale = grad_scales(ones.data(), w, N, reduction);
  std::vector<double> per_sample(B, 0.0);
  at::Tensor grad_pred = with_grad_output(args, model_output, [&] {
    if (N > 0) {
      per_sample = cpu::kernels().loss_forward(args);
    }
  });
  return {reduce(std::move(per_sample), w, N, reduction, model_output, loss_options), grad_pred};
}

at::Tensor diffusion_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& model_output,
                                       const std::optional<at::Tensor>& x_start, const at::Tensor& t,
                                       const at::Tensor& sqrt_ac, const at::Tensor& sqrt_1m_ac,
                                       const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
                                       int64_t offset, int64_t objective, std::optional<double> min_snr_gamma,
                                       int64_t reduction) {
  cpu::LossArgs args = prepare(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset, objective, reduction);
  const int64_t B = args.pred.size(0), N = args.pred.numel() / B;
  cpu::check_cpu(kOp, grad, "grad");
  TORCH_CHECK(grad.is_floating_point(), kOp, ": grad must be a floating tensor, got ", grad.scalar_type());
  const bool mean = reduction == contracts::REDUCTION_MEAN;
  TORCH_CHECK(mean ? grad.numel() == 1 : (grad.dim() == 1 && grad.size(0) == B), kOp,
              ": grad must have the loss's shape (", mean ? "[]" : "[B]", "), got ", grad.sizes());
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  const double* gp = g.const_data_ptr<double>();
  args.grad_scale = grad_scales(gp, weights(args, min_snr_gamma), N, reduction);
  return with_grad_output(args, model_output, [&] {
    if (N > 0) {
      cpu::kernels().loss_backward(args);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) {
  m.impl("diffusion_loss", &diffusion_loss_cpu);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_cpu);
}

}  // namespace fastddpm
