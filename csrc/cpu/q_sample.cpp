// q_sample on the CPU: the forward process of DDPM, eq. 4 reparameterised, with t per sample b:
//   x_t[b] = sqrt_alphas_cumprod[t[b]] * x_start[b] + sqrt_one_minus_alphas_cumprod[t[b]] * noise[b]
//
// Math in float (double for double inputs), output in x_start's dtype and memory format. Each element
// is computed on its own by the same code whatever the thread count, so results never depend on it. The
// element loop is csrc/cpu/fused_kernels.h's (AVX2 where the CPU has it), shared with q_sample_philox.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"

namespace fastddpm {
namespace {

constexpr const char* kOp = "q_sample";

// The two tables, 1-D of one length T (both ops).
void check_tables(const at::Tensor& sqrt_alphas_cumprod, const at::Tensor& sqrt_one_minus_alphas_cumprod) {
  cpu::check_table(kOp, sqrt_alphas_cumprod, "sqrt_alphas_cumprod");
  cpu::check_table(kOp, sqrt_one_minus_alphas_cumprod, "sqrt_one_minus_alphas_cumprod");
  TORCH_CHECK(sqrt_alphas_cumprod.size(0) == sqrt_one_minus_alphas_cumprod.size(0),
              "q_sample: sqrt_alphas_cumprod and sqrt_one_minus_alphas_cumprod must have the same length, ",
              "got ", sqrt_alphas_cumprod.size(0), " and ", sqrt_one_minus_alphas_cumprod.size(0));
}

// The given-noise op's own checks of x_start, t and noise (its messages, which tests/test_extension.py
// pins, predate the shared cpu::check_* the Philox op uses).
void check_given(const at::Tensor& x_start, const at::Tensor& t, const at::Tensor& noise) {
  cpu::check_cpu(kOp, x_start, "x_start");
  cpu::check_cpu(kOp, t, "t");
  cpu::check_cpu(kOp, noise, "noise");
  TORCH_CHECK(cpu::is_float_dtype(x_start.scalar_type()),
              "q_sample: x_start must be a floating tensor (float32, float64, float16 or bfloat16), got ",
              x_start.scalar_type());
  TORCH_CHECK(x_start.dim() >= 1, "q_sample: x_start must have at least 1 dimension (the batch)");
  TORCH_CHECK(noise.sizes() == x_start.sizes(), "q_sample: noise shape ", noise.sizes(),
              " must match x_start shape ", x_start.sizes());
  TORCH_CHECK(noise.scalar_type() == x_start.scalar_type(), "q_sample: noise dtype ", noise.scalar_type(),
              " must match x_start dtype ", x_start.scalar_type());
  TORCH_CHECK(t.scalar_type() == at::kLong, "q_sample: t must be int64 (torch.long), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x_start.size(0),
              "q_sample: t must be 1-D of size x_start.size(0) = ", x_start.size(0), ", got shape ", t.sizes());
}

// t as a vector, every value checked to lie in [0, T) (this op's message; cpu::timesteps words it otherwise).
std::vector<int64_t> checked_timesteps(const at::Tensor& t, int64_t T) {
  const auto ts = t.accessor<int64_t, 1>();
  std::vector<int64_t> out(ts.size(0));
  for (int64_t b = 0; b < ts.size(0); ++b) {
    TORCH_CHECK(0 <= ts[b] && ts[b] < T, "q_sample: t[", b, "] = ", ts[b], " is out of range [0, ", T, ")");
    out[b] = ts[b];
  }
  return out;
}

at::Tensor q_sample_cpu(const at::Tensor& x_start, const at::Tensor& t, const at::Tensor& sqrt_alphas_cumprod,
                        const at::Tensor& sqrt_one_minus_alphas_cumprod, const at::Tensor& noise) {
  check_given(x_start, t, noise);
  check_tables(sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod);
  const std::vector<int64_t> ts = checked_timesteps(t, sqrt_alphas_cumprod.size(0));
  std::vector<double> coef_x = cpu::gather(sqrt_alphas_cumprod, 0, ts);
  std::vector<double> coef_n = cpu::gather(sqrt_one_minus_alphas_cumprod, 0, ts);

  // The output is empty_like(x_start), as the op's fake implementation says: x_start's strides when it is
  // dense, else the suggested layout. The kernel walks raw memory with the batch outermost; for a dense
  // x_start whose batch is not outermost (a permuted view) it computes into a contiguous buffer instead.
  at::Tensor out = at::empty_like(x_start);
  const bool direct = cpu::batch_outer_dense(out);
  at::Tensor work = direct ? out : at::empty(x_start.sizes(), x_start.options());
  // Inputs that do not share the work buffer's strides are copied into that layout first.
  const at::Tensor x = cpu::as_layout_of(x_start, work);
  const at::Tensor n = cpu::as_layout_of(noise, work);

  const int64_t B = x.size(0);
  const int64_t S = B == 0 ? 0 : x.numel() / B;  // elements per sample
  if (S == 0) {
    return out;
  }
  cpu::QSampleArgs args;
  args.x = x;
  args.out = work;
  args.a = std::move(coef_x);
  args.s = std::move(coef_n);
  args.noise.given = n;
  cpu::kernels().q_sample(args);
  if (!direct) {
    out.copy_(work);
  }
  return out;
}

// The same with ε drawn in-kernel from Philox (seed, offset) (csrc/cpu/fused_kernels.h): reads x_0, writes x_t
// (and ε when write_noise). Outputs empty_like(x) for x = x_start made batch-outer dense.
std::tuple<at::Tensor, at::Tensor> q_sample_philox_cpu(const at::Tensor& x_start, const at::Tensor& t,
                                                       const at::Tensor& sqrt_alphas_cumprod,
                                                       const at::Tensor& sqrt_one_minus_alphas_cumprod,
                                                       const at::Tensor& seed, int64_t offset, bool write_noise) {
  cpu::check_data(kOp, x_start, "x_start");
  cpu::check_index(kOp, t, "t", x_start);
  check_tables(sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod);
  cpu::QSampleArgs args;
  args.noise.drawn = true;
  args.noise.seed = cpu::check_seed(kOp, seed);
  args.noise.offset = offset;
  const std::vector<int64_t> ts = cpu::timesteps(kOp, t, "t", sqrt_alphas_cumprod.size(0));
  args.a = cpu::gather(sqrt_alphas_cumprod, 0, ts);
  args.s = cpu::gather(sqrt_one_minus_alphas_cumprod, 0, ts);
  args.x = cpu::dense(x_start);
  args.out = at::empty_like(args.x);
  at::Tensor noise = write_noise ? at::empty_like(args.x) : args.x.new_empty({0});
  if (write_noise) {
    args.noise_out = noise;
  }
  cpu::kernels().q_sample(args);
  return {args.out, noise};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) {
  m.impl("q_sample", &q_sample_cpu);
  m.impl("q_sample_philox", &q_sample_philox_cpu);
}

}  // namespace fastddpm
