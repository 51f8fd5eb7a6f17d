// The element kernels of the fused CPU ops, compiled twice by csrc/cpu/fused_kernels.cpp: once inside
// `#pragma GCC target("avx2,fma")` with FASTDDPM_AVX2 = 1 (namespace avx2: explicit AVX2 Philox, log and
// sincos, AVX2 auto-vectorised element loops), once as plain C++ (namespace portable). No include guard: it is
// meant to be included twice, each time inside its own namespace.
//
// The noise: philox_normal.h (normals(seed, counter, n, out)).
//
// Work is split into tasks of kChunk elements of one sample, each run start to end by one thread whatever the
// thread count, so every output (the loss sums included: a fixed-order combination of per-task partials) is
// bit-identical for any number of threads.

// Elements a task handles per step: the noise of a block is drawn into a stack buffer, then used.
constexpr int64_t kBlock = 512;

#include "philox_normal.h"

// The tensors a block kernel streams through, as (data, element size), indexed like the noise (sample b,
// element lo: b·N + lo); null entries are skipped. The draw of a block's noise is compute-bound and its use
// memory-bound: the block's cache lines of these tensors are asked for before the draw, so that their
// reads (and the write-allocates of the outputs) overlap it instead of following it.
struct Streams {
  static constexpr int kMax = 5;
  const void* data[kMax] = {};
  int64_t size[kMax] = {};
  Streams(std::initializer_list<std::pair<const void*, int64_t>> list) {
    TORCH_INTERNAL_ASSERT(list.size() <= kMax);
    int k = 0;
    for (const auto& [d, s] : list) {
      data[k] = d;
      size[k++] = s;
    }
  }
  void prefetch(int64_t first, int64_t n) const {
    for (int k = 0; k < kMax; ++k) {
      if (data[k] != nullptr) {
        const char* p = static_cast<const char*>(data[k]) + first * size[k];
        for (int64_t off = 0; off < n * size[k]; off += 64) {
          __builtin_prefetch(p + off, 0, 3);
        }
      }
    }
  }
};

// Runs fn(b, lo, n, z) over every block of every sample (element offset lo within sample b, n elements, z the
// block's noise or nullptr), tasks of kChunk elements spread over the threads; where noise is drawn, the
// block's lines of `streams` are prefetched first.
template <typename Fn>
void for_each_block(int64_t B, int64_t N, const Noise* noise, const Streams& streams, const Fn& fn) {
  if (B == 0 || N == 0) {
    return;
  }
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  const uint64_t rows = static_cast<uint64_t>((N + 3) / 4);
  // (a grain of kGrainElements elements: tasks hold min(N, kChunk) elements, so that many small samples, e.g.
  // a batch of 8×8 images, stay on one thread instead of paying for the others' wake-up)
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::min(N, kChunk));
  at::parallel_for(0, B * chunks, grain, [&](int64_t begin, int64_t end) {
    alignas(32) float z[kBlock + 64];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks;
      const int64_t chunk_end = std::min(N, (task % chunks + 1) * kChunk);
      for (int64_t lo = (task % chunks) * kChunk; lo < chunk_end; lo += kBlock) {
        const int64_t n = std::min(kBlock, chunk_end - lo);
        if (noise != nullptr) {
          streams.prefetch(b * N + lo, n);
          normals(noise->seed,
                  static_cast<uint64_t>(noise->offset) + static_cast<uint64_t>(b) * rows + static_cast<uint64_t>(lo / 4),
                  n, z);
        }
        fn(task, b, lo, n, noise != nullptr ? z : nullptr);
      }
    }
  });
}

// Runs fn(b, lo, n) over runs of consecutive elements of one sample (sample b, elements [lo, lo + n)) that
// cover the B·N elements: the flat index range split over the threads as ATen's elementwise loops split it
// (grain kGrainElements), each thread's range cut at sample boundaries. For element-wise kernels with no
// noise to draw: every element is computed on its own by the same code, so the split changes no result.
template <typename Fn>
void for_each_run(int64_t B, int64_t N, const Fn& fn) {
  if (B == 0 || N == 0) {
    return;
  }
  at::parallel_for(0, B * N, kGrainElements, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t b = begin / N, lo = begin - b * N;
      const int64_t n = std::min(end - begin, N - lo);
      fn(b, lo, n);
      begin += n;
    }
  });
}

// ---------------------------------------------------------------- q_sample (noise given or drawn)
// x_t = a x_0 + s ε over n elements of one sample (its a = √ᾱ_t, s = √(1 − ᾱ_t)).
template <typename scalar_t, typename opmath_t>
inline void q_sample_given(const scalar_t* __restrict__ x, const scalar_t* __restrict__ noise,
                           scalar_t* __restrict__ out, opmath_t a, opmath_t s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(a * static_cast<opmath_t>(x[i]) + s * static_cast<opmath_t>(noise[i]));
  }
}

template <typename scalar_t>
void q_sample_philox_typed(const QSampleArgs& args) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = args.x.size(0), N = B == 0 ? 0 : args.x.numel() / B;
  const scalar_t* x = args.x.const_data_ptr<scalar_t>();
  scalar_t* out = args.out.mutable_data_ptr<scalar_t>();
  scalar_t* noise_out = args.noise_out.defined() ? args.noise_out.mutable_data_ptr<scalar_t>() : nullptr;
  if (!args.noise.drawn) {
    // ε given: a plain stream over long runs (no noise buffer to fill, so no kBlock-element blocks), as fast
    // as torch.add's loop. out is a fresh tensor: it aliases neither input.
    const scalar_t* given = args.noise.given.const_data_ptr<scalar_t>();
    for_each_run(B, N, [&](int64_t b, int64_t lo, int64_t n) {
      const int64_t base = b * N + lo;
      q_sample_given<scalar_t, opmath_t>(x + base, given + base, out + base, static_cast<opmath_t>(args.a[b]),
                                         static_cast<opmath_t>(args.s[b]), n);
    });
    return;
  }
  const Streams streams{{x, sizeof(scalar_t)}, {out, sizeof(scalar_t)}, {noise_out, sizeof(scalar_t)}};
  for_each_block(B, N, &args.noise, streams, [&](int64_t, int64_t b, int64_t lo, int64_t n, const float* z) {
    const int64_t base = b * N + lo;
    const auto a = static_cast<opmath_t>(args.a[b]), s = static_cast<opmath_t>(args.s[b]);
    const scalar_t* xb = x + base;
    scalar_t* ob = out + base;
    for (int64_t i = 0; i < n; ++i) {
      ob[i] = static_cast<scalar_t>(a * static_cast<opmath_t>(xb[i]) + s * static_cast<opmath_t>(z[i]));
    }
    if (noise_out != nullptr) {
      scalar_t* nb = noise_out + base;
      for (int64_t i = 0; i < n; ++i) {
        nb[i] = static_cast<scalar_t>(z[i]);
      }
    }
  });
}

void q_sample_philox(const QSampleArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "q_sample",
                                  [&] { q_sample_philox_typed<scalar_t>(args); });
}

// ---------------------------------------------------------------- the loss
// One pass per block: d = pred − target (target ε, x_0 or v = a ε − s x_0: DDPM eq. 14; Salimans & Ho),
// g = scale · d written where a gradient is asked for, Σ d² summed where the loss is. Specialised on the
// objective, on where ε comes from (a given tensor, or the block's draw z) and on what is written, so that
// the element loop has no branch and vectorises.
template <int kObjective, bool kGivenNoise>
struct LossVariant {
  static constexpr int objective = kObjective;
  static constexpr bool given_noise = kGivenNoise;
};

// Calls f(LossVariant<...>{}) for args' objective and noise source.
template <typename F>
void with_loss_variant(const LossArgs& args, const F& f) {
  const bool given = args.objective != 1 && !args.noise.drawn && args.noise.given.defined();
  switch (args.objective) {
    case 0: given ? f(LossVariant<0, true>{}) : f(LossVariant<0, false>{}); break;
    case 1: f(LossVariant<1, false>{}); break;
    default: given ? f(LossVariant<2, true>{}) : f(LossVariant<2, false>{}); break;
  }
}

// The block [base, base + n) of sample b: writes g[i] = scale · d[i] when kGrad, returns Σ d² when kSum
// (16 running sums, combined in a fixed order: vectorisable without reassociating), else 0.
template <typename Variant, bool kGrad, bool kSum, typename scalar_t, typename opmath_t>
inline double loss_block(const LossArgs& args, int64_t base, int64_t n, const float* z, opmath_t a, opmath_t s,
                         scalar_t* g, opmath_t scale) {
  const scalar_t* __restrict__ p = args.pred.const_data_ptr<scalar_t>() + base;
  const scalar_t* __restrict__ given =
      Variant::given_noise ? args.noise.given.const_data_ptr<scalar_t>() + base : nullptr;
  const scalar_t* __restrict__ x0 =
      Variant::objective != 0 ? args.x0.const_data_ptr<scalar_t>() + base : nullptr;
  scalar_t* __restrict__ gb = kGrad ? g + base : nullptr;
  auto diff = [&](int64_t i) -> opmath_t {
    opmath_t target;
    if constexpr (Variant::objective == 1) {
      target = static_cast<opmath_t>(x0[i]);
    } else {
      const opmath_t eps = Variant::given_noise ? static_cast<opmath_t>(given[i]) : static_cast<opmath_t>(z[i]);
      if constexpr (Variant::objective == 0) {
        target = eps;
      } else {
        target = a * eps - s * static_cast<opmath_t>(x0[i]);
      }
    }
    return static_cast<opmath_t>(p[i]) - target;
  };
  constexpr int kLanes = 16;
  opmath_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const opmath_t d = diff(i + k);
      if constexpr (kGrad) {
        gb[i + k] = static_cast<scalar_t>(scale * d);
      }
      if constexpr (kSum) {
        acc[k] += d * d;
      }
    }
  }
  for (; i < n; ++i) {
    const opmath_t d = diff(i);
    if constexpr (kGrad) {
      gb[i] = static_cast<scalar_t>(scale * d);
    }
    if constexpr (kSum) {
      acc[0] += d * d;
    }
  }
  double sum = 0.0;
  if constexpr (kSum) {
    for (int k = 0; k < kLanes; ++k) {
      sum += static_cast<double>(acc[k]);
    }
  }
  return sum;
}

// What the loss kernels stream: pred, x_0 where the objective reads it, and the gradient they write.
template <typename scalar_t>
Streams loss_streams(const LossArgs& args, const scalar_t* g) {
  const bool x0 = args.objective != 0 && args.x0.defined();
  return {{args.pred.const_data_ptr<scalar_t>(), sizeof(scalar_t)},
          {x0 ? args.x0.const_data_ptr<scalar_t>() : nullptr, sizeof(scalar_t)},
          {g, sizeof(scalar_t)}};
}

// The loss forward (kSum: per-sample Σ d², float64) and/or the gradient g = grad_scale[b] · d (kGrad: the
// backward, and the training forward, which writes the gradient for an incoming gradient of one).
template <typename scalar_t, bool kGrad, bool kSum>
std::vector<double> loss_pass(const LossArgs& args) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = args.pred.size(0), N = args.pred.numel() / B;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  std::vector<double> partial(kSum ? B * chunks : 0, 0.0);
  const bool drawn = args.objective != 1 && args.noise.drawn;
  scalar_t* g = kGrad ? args.grad_pred.mutable_data_ptr<scalar_t>() : nullptr;
  with_loss_variant(args, [&](auto variant) {
    using Variant = decltype(variant);
    for_each_block(B, N, drawn ? &args.noise : nullptr, loss_streams<scalar_t>(args, g),
                   [&](int64_t task, int64_t b, int64_t lo, int64_t n, const float* z) {
      const double sum = loss_block<Variant, kGrad, kSum, scalar_t, opmath_t>(
          args, b * N + lo, n, z, static_cast<opmath_t>(args.a[b]), static_cast<opmath_t>(args.s[b]), g,
          kGrad ? static_cast<opmath_t>(args.grad_scale[b]) : opmath_t(0));
      if constexpr (kSum) {
        partial[task] += sum;
      }
    });
  });
  std::vector<double> per_sample(kSum ? B : 0, 0.0);
  if constexpr (kSum) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < chunks; ++c) {
        per_sample[b] += partial[b * chunks + c];
      }
    }
  }
  return per_sample;
}

std::vector<double> loss_forward(const LossArgs& args) {
  std::vector<double> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.pred.scalar_type(), "diffusion_loss", [&] {
    out = args.grad_pred.defined() ? loss_pass<scalar_t, true, true>(args) : loss_pass<scalar_t, false, true>(args);
  });
  return out;
}

void loss_backward(const LossArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.pred.scalar_type(), "diffusion_loss_backward",
                                  [&] { loss_pass<scalar_t, true, false>(args); });
}

// ---------------------------------------------------------------- reverse steps
template <typename scalar_t, int64_t kObjective, bool kDdim>
void step_typed(const StepArgs& args) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = args.x.size(0), N = B == 0 ? 0 : args.x.numel() / B;
  const scalar_t* out = args.model_output.const_data_ptr<scalar_t>();
  const scalar_t* x = args.x.const_data_ptr<scalar_t>();
  const scalar_t* given = args.stochastic && !args.noise.drawn ? args.noise.given.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* x_prev = args.x_prev.mutable_data_ptr<scalar_t>();
  scalar_t* x0_out = args.x0_out.defined() ? args.x0_out.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* noise_out = args.noise_out.defined() ? args.noise_out.mutable_data_ptr<scalar_t>() : nullptr;
  const bool drawn = args.stochastic && args.noise.drawn;
  const Streams streams{{out, sizeof(scalar_t)}, {x, sizeof(scalar_t)}, {x_prev, sizeof(scalar_t)},
                        {x0_out, sizeof(scalar_t)}, {noise_out, sizeof(scalar_t)}};
  for_each_block(B, N, drawn ? &args.noise : nullptr, streams, [&](int64_t, int64_t b, int64_t lo, int64_t n, const float* z) {
    const int64_t base = b * N + lo;
    const auto r0 = static_cast<opmath_t>(args.r0[b]), r1 = static_cast<opmath_t>(args.r1[b]);
    const auto r2 = static_cast<opmath_t>(args.r2[b]), r3 = static_cast<opmath_t>(args.r3[b]);
    const auto c_x0 = static_cast<opmath_t>(args.c_x0[b]);
    const auto c_xt = static_cast<opmath_t>(kDdim ? args.c_dir[b] : args.c_xt[b]);
    const auto sigma = static_cast<opmath_t>(args.sigma[b]);
    const auto limit = static_cast<opmath_t>(args.limit[b]), divisor = static_cast<opmath_t>(args.divisor[b]);
    const bool rederive = args.rederive;
    const scalar_t* __restrict__ ob = out + base;
    const scalar_t* __restrict__ xb = x + base;
    scalar_t* __restrict__ pb = x_prev + base;
    // One pass: x_prev (and x̂_0 where asked for) written as they are computed; specialised on the noise
    // source (kNoise: 0 none, 1 given, 2 drawn) and on x̂_0 being written, so that the loop has no branch on
    // them.
    auto run = [&](auto noise_kind, auto write_x0) {
      constexpr int kNoise = decltype(noise_kind)::value;
      constexpr bool kWriteX0 = decltype(write_x0)::value;
      const scalar_t* __restrict__ gb = kNoise == 1 ? given + base : nullptr;
      scalar_t* __restrict__ x0b = kWriteX0 ? x0_out + base : nullptr;
      for (int64_t i = 0; i < n; ++i) {
        const auto o = static_cast<opmath_t>(ob[i]), xi = static_cast<opmath_t>(xb[i]);
        opmath_t raw;
        if constexpr (kObjective == contracts::PRED_NOISE) {  // ε: x̂_0 = √(1/ᾱ) x_t − √(1/ᾱ − 1) ε
          raw = r0 * xi - r1 * o;
        } else if constexpr (kObjective == contracts::PRED_X0) {
          raw = o;
        } else {  // v: x̂_0 = √ᾱ x_t − √(1 − ᾱ) v
          raw = r2 * xi - r3 * o;
        }
        const opmath_t lim = std::min(std::max(raw, -limit), limit) / divisor;
        opmath_t res;
        if constexpr (kDdim) {
          opmath_t eps;
          if (rederive) {  // ε̂ from the limited x̂_0
            eps = (xi - r2 * lim) / r3;
          } else if constexpr (kObjective == contracts::PRED_NOISE) {
            eps = o;
          } else if constexpr (kObjective == contracts::PRED_X0) {
            eps = (xi - r2 * raw) / r3;
          } else {
            eps = r3 * xi + r2 * o;
          }
          // x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε̂   (DDIM eq. 12; + σ z)
          res = c_x0 * lim + c_xt * eps;
        } else {
          // μ̃_t(x_t, x̂_0)   (DDPM eq. 7; + σ_t z, Algorithm 2)
          res = c_x0 * lim + c_xt * xi;
        }
        if constexpr (kNoise == 1) {
          res = res + sigma * static_cast<opmath_t>(gb[i]);
        } else if constexpr (kNoise == 2) {
          res = res + sigma * static_cast<opmath_t>(z[i]);
        }
        pb[i] = static_cast<scalar_t>(res);
        if constexpr (kWriteX0) {
          x0b[i] = static_cast<scalar_t>(lim);
        }
      }
    };
    auto with_x0 = [&](auto noise_kind) {
      x0_out != nullptr ? run(noise_kind, std::true_type{}) : run(noise_kind, std::false_type{});
    };
    if (!args.stochastic) {
      with_x0(std::integral_constant<int, 0>{});
    } else if (given != nullptr) {
      with_x0(std::integral_constant<int, 1>{});
    } else {
      with_x0(std::integral_constant<int, 2>{});
      if (noise_out != nullptr) {
        scalar_t* nb = noise_out + base;
        for (int64_t i = 0; i < n; ++i) {
          nb[i] = static_cast<scalar_t>(z[i]);
        }
      }
    }
  });
}

template <typename scalar_t, int64_t kObjective>
void step_for_objective(const StepArgs& args) {
  args.ddim ? step_typed<scalar_t, kObjective, true>(args) : step_typed<scalar_t, kObjective, false>(args);
}

template <typename scalar_t>
void step_dispatch(const StepArgs& args) {
  switch (args.objective) {
    case contracts::PRED_NOISE: step_for_objective<scalar_t, contracts::PRED_NOISE>(args); break;
    case contracts::PRED_X0: step_for_objective<scalar_t, contracts::PRED_X0>(args); break;
    default: step_for_objective<scalar_t, contracts::PRED_V>(args); break;
  }
}

void step(const StepArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "reverse_step",
                                  [&] { step_dispatch<scalar_t>(args); });
}

const Kernels table = {&q_sample_philox, &loss_forward, &loss_backward, &step, &normals};
