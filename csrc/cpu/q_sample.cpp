// q_sample on the CPU: the forward process of DDPM, eq. 4 reparameterised, with t per sample b:
//   x_t[b] = sqrt_alphas_cumprod[t[b]] * x_start[b] + sqrt_one_minus_alphas_cumprod[t[b]] * noise[b]
//
// with ε given or drawn in-kernel. Math in float (double for double inputs), output in x_start's dtype. Each
// element is computed on its own by the same code whatever the thread count, so results never depend on it.
// The element loop is csrc/cpu/fused_kernels.h's (AVX2 where the CPU has it).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"

namespace fastddpm {
namespace {

constexpr const char* kOp = "q_sample";

// The two tables, 1-D of one length T.
void check_tables(const at::Tensor& sqrt_alphas_cumprod, const at::Tensor& sqrt_one_minus_alphas_cumprod) {
  cpu::check_table(kOp, sqrt_alphas_cumprod, "sqrt_alphas_cumprod");
  cpu::check_table(kOp, sqrt_one_minus_alphas_cumprod, "sqrt_one_minus_alphas_cumprod");
  TORCH_CHECK(sqrt_alphas_cumprod.size(0) == sqrt_one_minus_alphas_cumprod.size(0),
              "q_sample: sqrt_alphas_cumprod and sqrt_one_minus_alphas_cumprod must have the same length, ",
              "got ", sqrt_alphas_cumprod.size(0), " and ", sqrt_one_minus_alphas_cumprod.size(0));
}

// The checks of x_start, t and a given noise (their messages, which tests/test_extension.py pins, predate the
// shared cpu::check_* the drawn-noise path uses).
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

// One kernel for both ways of getting ε: given (noise), or drawn in-kernel from Philox (seed, offset)
// (csrc/cpu/fused_kernels.h), written to the second output when write_noise. Reads x_0 (and ε when given),
// writes x_t (and ε when asked). Outputs are empty_like(x) for x = x_start made batch-outer dense (its own
// strides when it is, else contiguous): the layout the fake implementation (fastddpm/ops/q_sample.py) and the
// Triton kernel give. The second output is empty unless ε is drawn and write_noise.
std::tuple<at::Tensor, at::Tensor> q_sample_cpu(const at::Tensor& x_start, const at::Tensor& t,
                                                const at::Tensor& sqrt_alphas_cumprod,
                                                const at::Tensor& sqrt_one_minus_alphas_cumprod,
                                                const std::optional<at::Tensor>& noise,
                                                const std::optional<at::Tensor>& seed, int64_t offset,
                                                bool write_noise) {
  TORCH_CHECK(noise.has_value() != seed.has_value(), "q_sample: give exactly one of noise and seed");
  cpu::QSampleArgs args;
  std::vector<int64_t> ts;
  if (noise.has_value()) {
    check_given(x_start, t, *noise);
    check_tables(sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod);
    ts = checked_timesteps(t, sqrt_alphas_cumprod.size(0));
  } else {
    cpu::check_data(kOp, x_start, "x_start");
    cpu::check_index(kOp, t, "t", x_start);
    check_tables(sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod);
    args.noise.drawn = true;
    args.noise.seed = cpu::check_seed(kOp, *seed);
    args.noise.offset = offset;
    ts = cpu::timesteps(kOp, t, "t", sqrt_alphas_cumprod.size(0));
  }
  args.a = cpu::gather(sqrt_alphas_cumprod, 0, ts);
  args.s = cpu::gather(sqrt_one_minus_alphas_cumprod, 0, ts);
  args.x = cpu::dense(x_start);
  args.out = at::empty_like(args.x);
  const bool writes_noise = write_noise && !noise.has_value();
  at::Tensor noise_out = writes_noise ? at::empty_like(args.x) : args.x.new_empty({0});
  if (writes_noise) {
    args.noise_out = noise_out;
  }
  if (noise.has_value()) {
    args.noise.given = cpu::as_layout_of(*noise, args.x);  // ε in x's strides (a copy only where they differ)
  }
  if (args.x.numel() > 0) {
    cpu::kernels().q_sample(args);
  }
  return {args.out, noise_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) {
  m.impl("q_sample", &q_sample_cpu);
}

}  // namespace fastddpm
