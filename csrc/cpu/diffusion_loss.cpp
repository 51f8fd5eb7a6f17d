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
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/autograd.h>
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

// ---------------------------------------------------------------- the autograd of CPU tensors
// The op's autograd on CPU tensors (AutogradCPU, which takes precedence there over the Python
// register_autograd of fastddpm/ops/diffusion_loss.py, the autograd of every other device): the same saved
// tensors and backward, as a C++ graph node. At the CPU training step's small sizes the Python autograd's
// frames would cost several times the loss's kernels.
// torch.compile traces through it as through any C++ autograd formula (the ops are dispatched below
// autograd, to their fake kernels when tracing). torch.func transforms refuse C++ Functions: under them,
// fastddpm.ops.choose_backend picks the reference.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

using LossSig = std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
                                           const Tensor&, const OptTensor&, const OptTensor&, int64_t, int64_t,
                                           std::optional<double>, int64_t, bool);
using BackwardSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
                           const Tensor&, const OptTensor&, const OptTensor&, int64_t, int64_t,
                           std::optional<double>, int64_t);

const c10::TypedOperatorHandle<LossSig>& loss_op() {
  static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("fastddpm::diffusion_loss", "")
                                 .typed<LossSig>();
  return handle;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastddpm::diffusion_loss_backward", "").typed<BackwardSig>();
  return handle;
}

bool requires_grad(const OptTensor& x) { return x.has_value() && x->defined() && x->requires_grad(); }

OptTensor optional(const Tensor& x) { return x.defined() ? OptTensor(x) : std::nullopt; }

// Whether an incoming gradient is an ordinary CPU tensor, whose value can be read here: not a fake or
// functional tensor of a torch.compile trace, a functorch wrapper, nor a tensor subclass.
bool readable_on_host(const Tensor& grad) {
  const c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                    c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                    c10::DispatchKey::FuncTorchGradWrapper});
  return grad.device().is_cpu() && grad.layout() == at::kStrided && !grad.key_set().has_any(traced);
}

// table[t] (t clamped into [0, T), as fastddpm.reference.extract) shaped [B, 1, ..., 1] in x's compute dtype.
Tensor extract(const Tensor& table, const Tensor& t, const Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = t.size(0);
  return table.index_select(0, t.clamp(0, table.size(0) - 1))
      .to(at::promote_types(x.scalar_type(), at::kFloat))
      .reshape(shape);
}

// Saves what the backward reads: the inputs; or, with keep_grad, the gradient the forward wrote (a constant of
// the node) and what ∂L/∂x_0 and ∂L/∂ε are formed from (t and the tables). The backward scales the kept
// gradient by the incoming one (row b by grad[b] for per-sample losses), or returns it as it is for the
// usual loss.backward() of a mean loss (grad exactly 1, read on the host: free for a CPU tensor); else it
// calls diffusion_loss_backward.
struct DiffusionLossFunction : torch::autograd::Function<DiffusionLossFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& model_output, const OptTensor& x_start,
                               const Tensor& t, const Tensor& sqrt_ac, const Tensor& sqrt_1m_ac,
                               const OptTensor& noise, const OptTensor& seed, int64_t offset, int64_t objective,
                               std::optional<double> min_snr_gamma, int64_t reduction, bool keep_grad) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, kept] = loss_op().call(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset,
                                       objective, min_snr_gamma, reduction, keep_grad);
    ctx->set_materialize_grads(false);
    // (one entry: each saved_data entry is a hash-map insert)
    ctx->saved_data["args"] = c10::List<int64_t>(
        {offset, objective, reduction, static_cast<int64_t>(keep_grad),
         static_cast<int64_t>(model_output.scalar_type()),
         x_start.has_value() ? static_cast<int64_t>(x_start->scalar_type()) : -1,
         noise.has_value() ? static_cast<int64_t>(noise->scalar_type()) : -1});
    ctx->saved_data["min_snr_gamma"] = min_snr_gamma;
    if (keep_grad) {
      ctx->save_for_backward({kept, t, sqrt_ac, sqrt_1m_ac});
    } else {
      ctx->save_for_backward({model_output, x_start.value_or(Tensor()), t, sqrt_ac, sqrt_1m_ac,
                              noise.value_or(Tensor()), seed.value_or(Tensor())});
    }
    return {loss, kept};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(12);  // one per forward argument
    const Tensor& grad = grads[0];
    if (!grad.defined()) {  // only the kept gradient (a constant) reached the output
      return out;
    }
    // Grad mode is on inside a backward only with create_graph=True: the fused backward is not differentiable,
    // and its result would be a constant (silently wrong second derivatives). (The message: the Python
    // autograd's DOUBLE_BACKWARD_ERROR.)
    TORCH_CHECK(!at::GradMode::is_enabled(), "diffusion_loss: the fused loss has no double backward (a backward "
                "with create_graph=True); use backend='reference' for higher-order gradients");
    const c10::List<int64_t> args = ctx->saved_data["args"].toIntList();
    const int64_t offset = args.get(0), objective = args.get(1), reduction = args.get(2);
    const bool keep_grad = args.get(3) != 0, has_x_start = args.get(5) >= 0, has_noise = args.get(6) >= 0;
    const auto pred_dtype = static_cast<at::ScalarType>(args.get(4));
    const variable_list s = ctx->get_saved_variables();
    Tensor grad_pred, t, sqrt_ac, sqrt_1m_ac;
    if (keep_grad) {  // ∂L/∂pred for a gradient of one, times the gradient that came (per sample for none)
      const Tensor& kept = s[0];
      t = s[1];
      sqrt_ac = s[2];
      sqrt_1m_ac = s[3];
      if (reduction == contracts::REDUCTION_NONE) {
        std::vector<int64_t> shape(kept.dim(), 1);
        shape[0] = -1;
        grad_pred = kept.mul(grad.to(kept.scalar_type()).reshape(shape));
      } else if (readable_on_host(grad) && grad.item<double>() == 1.0) {
        grad_pred = kept;
      } else {
        grad_pred = kept.mul(grad.to(kept.scalar_type()));
      }
    } else {
      t = s[2];
      sqrt_ac = s[3];
      sqrt_1m_ac = s[4];
      grad_pred = backward_op().call(grad, s[0], optional(s[1]), t, sqrt_ac, sqrt_1m_ac, optional(s[5]),
                                     optional(s[6]), offset, objective,
                                     ctx->saved_data["min_snr_gamma"].toOptional<double>(), reduction);
    }
    // The target depends on ε and x_0: ∂L/∂target = −∂L/∂pred; ε (ε objective) or x_0 (x_0 objective)
    // directly, v = √ᾱ ε − √(1 − ᾱ) x_0 through its coefficients; formed only where an input needs it (a
    // full pass over the data). Edges: model_output 0, x_start 1 where given, then t and the tables, noise.
    if (has_x_start && objective != contracts::PRED_NOISE && ctx->needs_input_grad(1)) {
      out[1] = (objective == contracts::PRED_X0 ? grad_pred.neg() : extract(sqrt_1m_ac, t, grad_pred).mul(grad_pred))
                   .to(static_cast<at::ScalarType>(args.get(5)));
    }
    if (has_noise && objective != contracts::PRED_X0 && ctx->needs_input_grad(has_x_start ? 5 : 4)) {
      out[5] = (objective == contracts::PRED_NOISE ? grad_pred.neg()
                                                   : extract(sqrt_ac, t, grad_pred).neg().mul(grad_pred))
                   .to(static_cast<at::ScalarType>(args.get(6)));
    }
    out[0] = grad_pred.scalar_type() == pred_dtype ? grad_pred : grad_pred.to(pred_dtype);
    return out;
  }
};

std::tuple<Tensor, Tensor> diffusion_loss_autograd(
    const Tensor& model_output, const OptTensor& x_start, const Tensor& t, const Tensor& sqrt_ac,
    const Tensor& sqrt_1m_ac, const OptTensor& noise, const OptTensor& seed, int64_t offset, int64_t objective,
    std::optional<double> min_snr_gamma, int64_t reduction, bool keep_grad) {
  // A graph node only where a gradient can flow (as the Python autograd): Function::apply would still build
  // one and wrap every output.
  if (!(at::GradMode::is_enabled() &&
        (model_output.requires_grad() || requires_grad(x_start) || t.requires_grad() || sqrt_ac.requires_grad() ||
         sqrt_1m_ac.requires_grad() || requires_grad(noise) || requires_grad(seed)))) {
    at::AutoDispatchBelowADInplaceOrView below;
    return loss_op().call(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset, objective,
                          min_snr_gamma, reduction, keep_grad);
  }
  const variable_list out = DiffusionLossFunction::apply(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise,
                                                         seed, offset, objective, min_snr_gamma, reduction,
                                                         keep_grad);
  // The kept gradient leaves the node detached (a constant), rather than through mark_non_differentiable,
  // whose record compiled autograd refuses.
  return {out[0], out[1].detach()};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) {
  m.impl("diffusion_loss", &diffusion_loss_cpu);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastddpm, AutogradCPU, m) {
  m.impl("diffusion_loss", &diffusion_loss_autograd);
}

}  // namespace fastddpm
