// group_norm_silu and group_norm_silu_backward on CUDA: input checks, outputs, workspace, device guard and
// current stream around the plain-CUDA kernels of group_norm_silu.cu (schemas in csrc/fastddpm.cpp). The
// CUDA backward recomputes σ (bandwidth-bound: reading a saved SiLU' or y would cost more than the arithmetic),
// so the forward here takes no save_silu_grad and the backward no y or silu_grad.
//
// The outputs y and grad_x are empty_like(x), as the ops' fake implementations say: x's strides when x is
// dense, else its suggested memory format. The kernels read and write NCHW-contiguous or channels-last
// (NHWC, any rank) memory; inputs are brought into the output's layout first (no copy when they are in
// it already), and an output in any other dense layout is computed in a contiguous buffer and copied.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "group_norm_silu.h"

namespace fastddpm {
namespace {

using cuda::GnDtype;
using cuda::GnLayout;

GnDtype gn_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat:
      return GnDtype::kFloat32;
    case at::kHalf:
      return GnDtype::kFloat16;
    case at::kBFloat16:
      return GnDtype::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "group_norm_silu: unsupported dtype ", s);
  return GnDtype::kFloat32;
}

bool is_kernel_dtype(at::ScalarType s) { return s == at::kFloat || s == at::kHalf || s == at::kBFloat16; }

bool is_float_dtype(at::ScalarType s) { return is_kernel_dtype(s) || s == at::kDouble; }

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// x: a CUDA tensor [N, C, *] of a dtype the kernels take, C divisible by num_groups.
void check_x(const at::Tensor& x, int64_t num_groups, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor here, got one on ", x.device());
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), op,
              ": x must be float32, float16 or bfloat16 on CUDA, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, op, ": x must have at least 2 dimensions [N, C, *], got shape ", x.sizes());
  TORCH_CHECK(num_groups > 0, op, ": num_groups must be positive, got ", num_groups);
  TORCH_CHECK(x.size(1) % num_groups == 0, op, ": the number of channels C = ", x.size(1),
              " must be divisible by num_groups = ", num_groups);
}

// weight / bias: absent, or a floating [C] tensor on x's device.
void check_affine(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* name, const char* op) {
  if (!present(t)) {
    return;
  }
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ",
              t->device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), op, ": ", name, " must have shape [C] = [", x.size(1),
              "], got ", t->sizes());
  TORCH_CHECK(is_float_dtype(t->scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              t->scalar_type());
}

// mean / rstd as the forward returns them: float32 [N, G] on x's device.
void check_stats(const at::Tensor& t, const at::Tensor& x, int64_t num_groups, const char* name, const char* op) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == num_groups, op, ": ", name,
              " must have shape [N, num_groups] = [", x.size(0), ", ", num_groups, "], got ", t.sizes());
}

int64_t spatial_size(const at::Tensor& x) {
  int64_t hw = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    hw *= x.size(d);
  }
  return hw;
}

// The permutation [N, C, *] -> [N, *, C] and back.
std::vector<int64_t> to_channels_last_dims(int64_t dim) {
  std::vector<int64_t> p{0};
  for (int64_t d = 2; d < dim; ++d) {
    p.push_back(d);
  }
  p.push_back(1);
  return p;
}

std::vector<int64_t> from_channels_last_dims(int64_t dim) {
  std::vector<int64_t> p{0, dim - 1};
  for (int64_t d = 1; d < dim - 1; ++d) {
    p.push_back(d);
  }
  return p;
}

// Dense with the channels innermost: channels_last, channels_last_3d, or the like for any rank > 2.
bool is_channels_last_dense(const at::Tensor& t) {
  return t.dim() > 2 && t.permute(to_channels_last_dims(t.dim())).is_contiguous();
}

// The kernel layout that writes `out` directly, if there is one.
std::optional<GnLayout> layout_of(const at::Tensor& out) {
  if (out.is_contiguous()) {
    return GnLayout::kNCHW;
  }
  if (is_channels_last_dense(out)) {
    return GnLayout::kNHWC;
  }
  return std::nullopt;
}

// t with the memory of `layout` (t itself when it already has it).
at::Tensor in_layout(const at::Tensor& t, GnLayout layout) {
  if (layout == GnLayout::kNCHW) {
    return t.contiguous();
  }
  if (is_channels_last_dense(t)) {
    return t;
  }
  return t.permute(to_channels_last_dims(t.dim())).contiguous().permute(from_channels_last_dims(t.dim()));
}

// The device's SM count, looked up once per device.
int multiprocessor_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};
  const bool cacheable = device >= 0 && device < static_cast<int>(cache.size());
  if (cacheable) {
    if (const int n = cache[device].load(std::memory_order_relaxed); n > 0) {
      return n;
    }
  }
  int n = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  TORCH_CHECK(err == cudaSuccess && n > 0, "group_norm_silu: cannot read the SM count of cuda:", int{device}, ": ",
              cudaGetErrorString(err));
  if (cacheable) {
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// weight / bias as the float32 contiguous [C] the kernels read, or an undefined tensor.
at::Tensor as_float(const std::optional<at::Tensor>& t) {
  return present(t) ? t->to(at::kFloat).contiguous() : at::Tensor();
}

const float* float_ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_forward_cuda(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool save_silu_grad) {
  constexpr const char* op = "group_norm_silu";
  TORCH_CHECK(!save_silu_grad, op, ": save_silu_grad=True is CPU only (the CUDA backward recomputes SiLU')");
  check_x(x, num_groups, op);
  check_affine(weight, x, "weight", op);
  check_affine(bias, x, "bias", op);
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t N = x.size(0), C = x.size(1), G = num_groups;
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({N, G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({N, G}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    // As torch.native_group_norm: an empty group has mean 0 and variance 0/0.
    mean.zero_();
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, mean, rstd, at::empty({0}, mean.options())};
  }
  const std::optional<GnLayout> direct = layout_of(y);
  const GnLayout layout = direct.value_or(GnLayout::kNCHW);
  at::Tensor out = direct ? y : at::empty(x.sizes(), x.options());
  const at::Tensor xl = in_layout(x, layout);
  const at::Tensor w = as_float(weight), b = as_float(bias);

  const cuda::GnForwardArgs args{{N, C, spatial_size(x), G, layout, gn_dtype(x.scalar_type())},
                                 xl.const_data_ptr(),
                                 float_ptr(w),
                                 float_ptr(b),
                                 static_cast<float>(eps),
                                 out.mutable_data_ptr(),
                                 mean.mutable_data_ptr<float>(),
                                 rstd.mutable_data_ptr<float>()};
  const int num_sms = multiprocessor_count(x.device().index());
  const size_t bytes = cuda::group_norm_silu_forward_workspace_bytes(args, num_sms);
  at::Tensor ws = workspace(bytes, x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_launch(
      cuda::launch_group_norm_silu_forward(args, bytes > 0 ? ws.mutable_data_ptr() : nullptr, bytes, num_sms, stream),
      op);
  if (!direct) {
    y.copy_(out);
  }
  return {y, mean, rstd, at::empty({0}, mean.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t num_groups,
    const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& silu_grad) {
  constexpr const char* op = "group_norm_silu_backward";
  TORCH_CHECK(!present(y) && !present(silu_grad), op,
              ": y and silu_grad are CPU only (the CUDA backward recomputes SiLU'); pass neither");
  check_x(x, num_groups, op);
  TORCH_CHECK(grad_y.device() == x.device(), op, ": grad_y must be on the device of x (", x.device(), "), got ",
              grad_y.device());
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y shape ", grad_y.sizes(), " must match x shape ", x.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y dtype ", grad_y.scalar_type(),
              " must match x dtype ", x.scalar_type());
  check_stats(mean, x, num_groups, "mean", op);
  check_stats(rstd, x, num_groups, "rstd", op);
  check_affine(weight, x, "weight", op);
  check_affine(bias, x, "bias", op);
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t N = x.size(0), C = x.size(1), G = num_groups;
  at::Tensor grad_x = at::empty_like(x);
  // dγ, dβ in float32 from the kernels; in weight's / bias's dtype on return; empty when absent.
  at::Tensor grad_w = present(weight) ? at::empty({C}, x.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor grad_b = present(bias) ? at::empty({C}, x.options().dtype(at::kFloat)) : at::Tensor();
  auto finish = [&](const at::Tensor& g, const std::optional<at::Tensor>& p) {
    return present(p) ? g.to(p->scalar_type()) : at::empty({0}, x.options());
  };
  if (x.numel() == 0) {
    if (grad_w.defined()) {
      grad_w.zero_();
    }
    if (grad_b.defined()) {
      grad_b.zero_();
    }
    return {grad_x, finish(grad_w, weight), finish(grad_b, bias)};
  }
  const std::optional<GnLayout> direct = layout_of(grad_x);
  const GnLayout layout = direct.value_or(GnLayout::kNCHW);
  at::Tensor out = direct ? grad_x : at::empty(x.sizes(), x.options());
  const at::Tensor xl = in_layout(x, layout);
  const at::Tensor dyl = in_layout(grad_y, layout);
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const at::Tensor w = as_float(weight), b = as_float(bias);

  const cuda::GnBackwardArgs args{{N, C, spatial_size(x), G, layout, gn_dtype(x.scalar_type())},
                                  dyl.const_data_ptr(),
                                  xl.const_data_ptr(),
                                  mean_c.const_data_ptr<float>(),
                                  rstd_c.const_data_ptr<float>(),
                                  float_ptr(w),
                                  float_ptr(b),
                                  out.mutable_data_ptr(),
                                  grad_w.defined() ? grad_w.mutable_data_ptr<float>() : nullptr,
                                  grad_b.defined() ? grad_b.mutable_data_ptr<float>() : nullptr};
  const int num_sms = multiprocessor_count(x.device().index());
  const size_t bytes = cuda::group_norm_silu_backward_workspace_bytes(args, num_sms);
  at::Tensor ws = workspace(bytes, x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_launch(cuda::launch_group_norm_silu_backward(args, bytes > 0 ? ws.mutable_data_ptr() : nullptr, bytes,
                                                     num_sms, stream),
               op);
  if (!direct) {
    grad_x.copy_(out);
  }
  return {grad_x, finish(grad_w, weight), finish(grad_b, bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) {
  m.impl("group_norm_silu", &group_norm_silu_forward_cuda);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cuda);
}

}  // namespace fastddpm
