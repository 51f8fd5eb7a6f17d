// The C++ autograd (the Autograd dispatch key) of group_norm_silu, on any device.
//
// C++ rather than torch.library.register_autograd: that Python layer costs more per forward + backward than
// group_norm_silu's kernels at the small U-Net's 4×4 and 8×8 maps. Here the graph node is a C++
// torch::autograd::Function: the same saved tensors and backward op calls, without the Python frames.
// torch.compile traces through it as through any C++ autograd formula (the ops are dispatched below autograd,
// to their fake kernels when tracing). The backward ops have no autograd of their own: a backward that builds
// a graph (create_graph=True, for double backward) computes the gradients from x, weight and bias with
// differentiable ATen ops instead (reference_backward), which autograd differentiates.
//
//   group_norm_silu        saves (x, mean, rstd, weight, bias) and what group_norm_silu_backward forms SiLU'
//                          from: silu_grad where the forward was asked for it (save_silu_grad); else, on the
//                          CPU for float32/float64 x, the output y; else nothing (σ recomputed)
// mean, rstd and silu_grad are not differentiable: they leave the node past it (its one output is y).
// torch.func transforms refuse C++ Functions: under them, fastddpm.ops.choose_backend picks the reference.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastddpm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Three = std::tuple<Tensor, Tensor, Tensor>;
using Four = std::tuple<Tensor, Tensor, Tensor, Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

bool defined(const OptTensor& p) {
  return p.has_value() && p->defined();
}

// One gradient per forward argument (x, num_groups, weight, bias, eps, save_silu_grad, statistics): those asked
// for, undefined elsewhere. needs_input_grad counts tensor inputs only: x is edge 0, then weight and bias where
// given.
variable_list input_grads(AutogradContext* ctx, const Three& grads, const OptTensor& weight, const OptTensor& bias) {
  const bool has_weight = defined(weight), has_bias = defined(bias);
  const size_t weight_edge = 1, bias_edge = has_weight ? 2 : 1;
  const auto& [grad_x, grad_weight, grad_bias] = grads;
  return {ctx->needs_input_grad(0) ? grad_x : Tensor(), Tensor(),
          has_weight && ctx->needs_input_grad(weight_edge) ? grad_weight : Tensor(),
          has_bias && ctx->needs_input_grad(bias_edge) ? grad_bias : Tensor(), Tensor(), Tensor(), Tensor()};
}

OptTensor optional(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

template <typename... T>
variable_list as_list(const std::tuple<T...>& t) {
  return std::apply([](const auto&... v) { return variable_list{v...}; }, t);
}

using ForwardSig = Four(const Tensor&, int64_t, const OptTensor&, const OptTensor&, double, bool);
using BackwardSig = Three(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                          const OptTensor&, int64_t, const OptTensor&, const OptTensor&);

const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto handle = op<ForwardSig>("fastddpm::group_norm_silu");
  return handle;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto handle = op<BackwardSig>("fastddpm::group_norm_silu_backward");
  return handle;
}

// Whether the backward of group_norm_silu forms SiLU'(z) from the output y rather than recomputing σ: on the CPU
// for float32 and float64 x. That saves y (which the caller holds anyway, as the next layer's input) and costs
// one division per element instead of σ's exp and division. A bfloat16 or float16 y holds too few bits of σ
// (those dtypes train with save_silu_grad), and GPUs recompute σ.
bool backward_from_output(const Tensor& x) {
  return x.is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
}

// The gradients of y = SiLU(GroupNorm(x)) from x, weight and bias, in ATen ops that autograd records
// (computed in float32, float64 for float64 x): for a backward that is itself differentiated
// (create_graph=True: grad mode on inside the backward). The statistics are recomputed from x: their own
// gradients count then.
//   x̂ = (x − μ) r, r = 1/√(σ² + eps) per group; z = x̂ w + b; g_z = g_y σ(z)(1 + z(1 − σ(z)));
//   g_b = Σ g_z, g_w = Σ g_z x̂ (over all but the channel dim); g_x̂ = g_z w;
//   g_x = r (g_x̂ − mean(g_x̂) − x̂ mean(g_x̂ x̂)) (means over each group).
Three reference_backward(const Tensor& grad_y, const Tensor& x, const OptTensor& weight,
                         const OptTensor& bias, int64_t num_groups, double eps) {
  const at::ScalarType compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = x.size(0), C = x.size(1);
  std::vector<int64_t> channel_shape(x.dim(), 1), reduce_dims{0};
  channel_shape[1] = C;
  for (int64_t d = 2; d < x.dim(); ++d) {
    reduce_dims.push_back(d);
  }
  const Tensor xg = x.to(compute).reshape({N, num_groups, -1});
  const Tensor centered = xg - xg.mean(-1, true);
  const Tensor rstd = (centered.square().mean(-1, true) + eps).rsqrt();
  const Tensor x_hat = (centered * rstd).reshape(x.sizes());
  Tensor z = defined(weight) ? x_hat * weight->to(compute).reshape(channel_shape) : x_hat;
  if (defined(bias)) {
    z = z + bias->to(compute).reshape(channel_shape);
  }
  const Tensor sig = z.sigmoid();
  const Tensor grad_z = grad_y.to(compute) * sig * (1 + z * (1 - sig));
  const Tensor grad_weight =
      defined(weight) ? (grad_z * x_hat).sum(reduce_dims).to(weight->scalar_type()) : Tensor();
  const Tensor grad_bias = defined(bias) ? grad_z.sum(reduce_dims).to(bias->scalar_type()) : Tensor();
  const Tensor grad_xh = (defined(weight) ? grad_z * weight->to(compute).reshape(channel_shape) : grad_z)
                             .reshape({N, num_groups, -1});
  const Tensor xh = x_hat.reshape({N, num_groups, -1});
  const Tensor grad_x = rstd * (grad_xh - grad_xh.mean(-1, true) - xh * (grad_xh * xh).mean(-1, true));
  return {grad_x.reshape(x.sizes()).to(x.scalar_type()), grad_weight, grad_bias};
}

// What the backward forms SiLU' from (saved after x, mean, rstd; weight and bias last).
enum class SavedForSiluGrad : int64_t { kNothing, kOutput, kSiluGrad };

// The node's one output is y. The op's other outputs (mean, rstd, silu_grad: constants, not differentiable) go
// to `*statistics` instead, past the node: no output of it to detach, and no mark_non_differentiable, whose
// record compiled autograd refuses (CppNode::compiled_args asserts that none was marked).
struct GroupNormSiLUFunction : torch::autograd::Function<GroupNormSiLUFunction> {
  // saved (x, mean, rstd[, silu_grad or y], weight, bias)
  static variable_list forward(AutogradContext* ctx, const Tensor& x, int64_t num_groups, const OptTensor& weight,
                               const OptTensor& bias, double eps, bool save_silu_grad, Four* statistics) {
    at::AutoDispatchBelowADInplaceOrView below;
    *statistics = forward_op().call(x, num_groups, weight, bias, eps, save_silu_grad);
    const variable_list out = as_list(*statistics);
    const SavedForSiluGrad kind = save_silu_grad           ? SavedForSiluGrad::kSiluGrad
                                  : backward_from_output(x) ? SavedForSiluGrad::kOutput
                                                            : SavedForSiluGrad::kNothing;
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["kind"] = static_cast<int64_t>(kind);
    ctx->set_materialize_grads(false);
    variable_list saved{x, out[1], out[2]};
    if (kind == SavedForSiluGrad::kSiluGrad) {
      saved.push_back(out[3]);
    } else if (kind == SavedForSiluGrad::kOutput) {
      saved.push_back(out[0]);  // an output: autograd keeps it without a reference cycle, and refuses a
                                // backward after an in-place change of y (as for torch.sigmoid or relu)
    }
    saved.push_back(weight.value_or(Tensor()));
    saved.push_back(bias.value_or(Tensor()));
    ctx->save_for_backward(saved);
    return {out[0]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) {
      return variable_list(7);
    }
    const variable_list s = ctx->get_saved_variables();
    const int64_t num_groups = ctx->saved_data["num_groups"].toInt();
    const OptTensor weight = optional(s[s.size() - 2]), bias = optional(s[s.size() - 1]);
    if (at::GradMode::is_enabled()) {  // create_graph=True: gradients that can be differentiated again
      return input_grads(ctx, reference_backward(grads[0], s[0], weight, bias, num_groups,
                                                 ctx->saved_data["eps"].toDouble()), weight, bias);
    }
    const auto kind = static_cast<SavedForSiluGrad>(ctx->saved_data["kind"].toInt());
    const OptTensor y = kind == SavedForSiluGrad::kOutput ? OptTensor(s[3]) : std::nullopt;
    const OptTensor silu_grad = kind == SavedForSiluGrad::kSiluGrad ? OptTensor(s[3]) : std::nullopt;
    return input_grads(ctx, backward_op().call(grads[0], s[0], s[1], s[2], weight, bias, num_groups, y, silu_grad),
                       weight, bias);
  }
};

// Whether a graph node is needed: grad mode on and some input requiring grad. Without one (sampling, no_grad)
// the call goes straight to the kernel: Function::apply would still build a node and wrap every output.
bool needs_node(const Tensor& x, const OptTensor& weight, const OptTensor& bias) {
  return at::GradMode::is_enabled() && (x.requires_grad() || (defined(weight) && weight->requires_grad()) ||
                                        (defined(bias) && bias->requires_grad()));
}

Four group_norm_silu_autograd(const Tensor& x, int64_t num_groups, const OptTensor& weight, const OptTensor& bias,
                              double eps, bool save_silu_grad) {
  if (!needs_node(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op().call(x, num_groups, weight, bias, eps, save_silu_grad);
  }
  Four out;
  const variable_list y = GroupNormSiLUFunction::apply(x, num_groups, weight, bias, eps, save_silu_grad, &out);
  return {y[0], std::get<1>(out), std::get<2>(out), std::get<3>(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, Autograd, m) {
  m.impl("group_norm_silu", &group_norm_silu_autograd);
}

}  // namespace fastddpm
