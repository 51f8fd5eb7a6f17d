// Shared by the fused CPU ops (csrc/cpu/{q_sample,diffusion_loss,reverse_step}.cpp): input checks, the
// batch-outer dense layout the kernels stream, per-sample table lookups, and the interface of the element
// kernels of csrc/cpu/fused_kernels.cpp (compiled twice there: AVX2+FMA, and plain C++ for other CPUs).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

namespace fastddpm {
namespace cpu {

// Elements per task of the parallel loops: a fixed split of each sample (a multiple of 4, so a task starts
// on a Philox counter boundary), independent of the thread count.
constexpr int64_t kChunk = 4096;
// Fewest elements worth a thread (ATen's GRAIN_SIZE for elementwise kernels).
constexpr int64_t kGrainElements = 32768;

inline bool is_float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

inline void check_cpu(const char* op, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", x.device());
}

// A floating data tensor with a batch dimension; with like's shape when given (dtypes may differ: see
// work_dtype).
inline void check_data(const char* op, const at::Tensor& x, const char* name, const at::Tensor* like = nullptr) {
  check_cpu(op, x, name);
  TORCH_CHECK(is_float_dtype(x.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": ", name, " must have a batch dimension, got a 0-d tensor");
  if (like != nullptr) {
    TORCH_CHECK(x.sizes() == like->sizes(), op, ": ", name, " has shape ", x.sizes(), ", expected ", like->sizes());
  }
}

inline void check_index(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_cpu(op, t, name);
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == x.size(0), op, ": ", name,
              " must be int64 of shape [", x.size(0), "] (one per sample), got ", t.scalar_type(), " ", t.sizes());
}

inline void check_table(const char* op, const at::Tensor& table, const char* name, int64_t rows = 0) {
  check_cpu(op, table, name);
  TORCH_CHECK(table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble, op, ": table ", name,
              " must be float32 or float64, got ", table.scalar_type());
  if (rows == 0) {
    TORCH_CHECK(table.dim() == 1 && table.size(0) >= 1, op, ": table ", name, " must be 1-D [T], got shape ",
                table.sizes());
  } else {
    TORCH_CHECK(table.dim() == 2 && table.size(0) >= rows && table.size(1) >= 1, op, ": table ", name,
                " must be [", rows, ", T], got shape ", table.sizes());
  }
}

inline uint64_t check_seed(const char* op, const at::Tensor& seed) {
  check_cpu(op, seed, "seed");
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, op,
              ": seed must be an int64 tensor with one element, got ", seed.scalar_type(), " ", seed.sizes());
  return static_cast<uint64_t>(seed.const_data_ptr<int64_t>()[0]);
}

// t as a vector, every value checked to lie in [low, T) (low = -1 allows DDIM's end marker).
inline std::vector<int64_t> timesteps(const char* op, const at::Tensor& t, const char* name, int64_t T,
                                      int64_t low = 0) {
  const at::Tensor tc = t.contiguous();
  const int64_t* p = tc.const_data_ptr<int64_t>();
  std::vector<int64_t> out(p, p + tc.numel());
  for (size_t b = 0; b < out.size(); ++b) {
    TORCH_CHECK(low <= out[b] && out[b] < T, op, ": timesteps must lie in [", low, ", ", T, "), got ", name, "[",
                b, "] = ", out[b]);
  }
  return out;
}

// row[t[b]] for each sample, in float64 (rows of a 1-D or 2-D float32 or float64 table, as check_table
// allows), read in place: no conversion of the table, no allocation but the result. t < 0 (DDIM's end
// marker) reads column 0; callers check t's range (timesteps).
inline std::vector<double> gather(const at::Tensor& table, int64_t row, const std::vector<int64_t>& t) {
  const int64_t stride = table.stride(table.dim() - 1);
  const int64_t start = table.dim() == 1 ? 0 : row * table.stride(0);
  std::vector<double> out(t.size());
  auto read = [&](const auto* p) {
    p += start;
    for (size_t b = 0; b < t.size(); ++b) {
      out[b] = static_cast<double>(p[(t[b] < 0 ? 0 : t[b]) * stride]);
    }
  };
  if (table.scalar_type() == at::kDouble) {
    read(table.const_data_ptr<double>());
  } else {
    TORCH_CHECK(table.scalar_type() == at::kFloat, "table must be float32 or float64, got ", table.scalar_type());
    read(table.const_data_ptr<float>());
  }
  return out;
}

// Dense (any dim order, e.g. channels_last) with each sample one contiguous block of memory; as
// fastddpm.ops.batch_outer_dense.
inline bool batch_outer_dense(const at::Tensor& x) {
  if (x.is_contiguous()) {
    return true;
  }
  if (!x.is_non_overlapping_and_dense()) {
    return false;
  }
  return x.size(0) <= 1 || x.stride(0) == x.numel() / x.size(0);
}

inline at::Tensor dense(const at::Tensor& x) { return batch_outer_dense(x) ? x : x.contiguous(); }

// y with exactly x's strides and dtype (a copy only where they differ).
inline at::Tensor as_layout_of(const at::Tensor& y, const at::Tensor& x) {
  if (y.strides() == x.strides() && y.scalar_type() == x.scalar_type()) {
    return y;
  }
  return at::empty_like(x).copy_(y);
}

// The dtype the kernels read every data tensor in: the common one, or, when the inputs mix dtypes (a bf16
// network output with fp32 data), their promotion with float32, so that no input loses precision.
inline at::ScalarType work_dtype(at::ScalarType primary, std::initializer_list<const at::Tensor*> others) {
  at::ScalarType out = primary;
  bool mixed = false;
  for (const at::Tensor* t : others) {
    if (t != nullptr && t->defined() && t->scalar_type() != primary) {
      mixed = true;
      out = c10::promoteTypes(out, t->scalar_type());
    }
  }
  return mixed ? c10::promoteTypes(out, at::kFloat) : primary;
}

// ---------------------------------------------------------------- the element kernels (fused_kernels.cpp)
// Every tensor passed is batch-outer dense with the strides of the first data tensor, B samples of N
// elements; per-sample scalars come in float64 and are rounded to the math type (float, double for double
// data) in the kernels. Noise: element i of sample b is lane i % 4 of Philox 4x32-10 at key `seed`, counter
// offset + b * ceil(N / 4) + i / 4 (kernels/noise.py).
struct Noise {
  bool drawn = false;  // drawn from (seed, offset), else read from `given`
  at::Tensor given;    // undefined when drawn
  uint64_t seed = 0;
  int64_t offset = 0;
};

struct QSampleArgs {
  at::Tensor x, out, noise_out;  // noise_out undefined: not written
  std::vector<double> a, s;      // √ᾱ_t, √(1 − ᾱ_t)
  Noise noise;
};

struct LossArgs {
  at::Tensor pred, x0;  // x0 undefined for the ε objective
  int objective = 0;
  std::vector<double> a, s;
  Noise noise;  // unused for the x_0 objective
  at::Tensor grad_pred;            // backward (and the training forward): the gradient written
  std::vector<double> grad_scale;  // with grad_pred: g_b · w_b · 2 / N
};

struct StepArgs {
  at::Tensor model_output, x, x_prev, x0_out, noise_out;  // x0_out / noise_out undefined: not written
  int objective = 0;
  bool ddim = false;
  // Per sample: r0 √(1/ᾱ), r1 √(1/ᾱ − 1), r2 √ᾱ, r3 √(1 − ᾱ); ancestral: c_x0, c_xt (μ̃ coefficients);
  // DDIM: c_x0 = √ᾱ_prev, c_dir = √(1 − ᾱ_prev − σ²); sigma (0 where there is no noise); the x̂_0 limit
  // clamp(x̂_0, −limit, limit) / divisor (limit = inf, divisor = 1 when off).
  std::vector<double> r0, r1, r2, r3, c_x0, c_xt, c_dir, sigma, limit, divisor;
  bool rederive = false;    // DDIM: ε̂ from the limited x̂_0
  bool stochastic = true;   // add σ z (DDIM: eta != 0)
  Noise noise;
};

struct Kernels {
  void (*q_sample)(const QSampleArgs&);  // ε given or drawn
  std::vector<double> (*loss_forward)(const LossArgs&);  // per-sample Σ (pred − target)², float64
  void (*loss_backward)(const LossArgs&);
  void (*step)(const StepArgs&);
  void (*normals)(uint64_t seed, uint64_t counter, int64_t n, float* out);  // n normals from counter on
};

// The AVX2+FMA build when the CPU has both, else the portable one; chosen once, at first use.
const Kernels& kernels();

}  // namespace cpu
}  // namespace fastddpm
