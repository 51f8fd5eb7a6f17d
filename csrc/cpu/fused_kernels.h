// The element kernels of the fused CPU ops, compiled twice by csrc/cpu/fused_kernels.cpp: once inside
// `#pragma GCC target("avx2,fma")` with FASTDDPM_AVX2 = 1 (namespace avx2: explicit AVX2 Philox, log and
// sincos, AVX2 auto-vectorised element loops), once as plain C++ (namespace portable). No include guard: it is
// meant to be included twice, each time inside its own namespace.
//
// The noise (kernels/noise.py, fastddpm.reference.philox_normal): element i of sample b takes lane i % 4 of
// Philox 4x32-10 (key = seed lo/hi words, counter words (lo32 c, hi32 c, 0, 0), c = offset + b·⌈N/4⌉ + ⌊i/4⌋),
// each word mapped to [0, 1) as Triton's uint_to_uniform_float, then Box–Muller on lanes (0, 1) and (2, 3):
// u1 = max(1e-7, u1), θ = 2π·u2, r = √(−2 log u1) → (r cos θ, r sin θ). One Philox evaluation per 4 elements.
//
// Work is split into tasks of kChunk elements of one sample, each run start to end by one thread whatever the
// thread count, so every output (the loss sums included: a fixed-order combination of per-task partials) is
// bit-identical for any number of threads.

// Elements a task handles per step: the noise of a block is drawn into a stack buffer, then used.
constexpr int64_t kBlock = 512;

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;

inline float uniform(uint32_t x) {
  int32_t v = static_cast<int32_t>(x);
  v = v < 0 ? ~v : v;  // -v - 1
  return static_cast<float>(v) * 4.6566127342e-10f;
}

// Four normals of counter c under key seed, scalar.
inline void philox_normal4(uint64_t seed, uint64_t c, float* out) {
  uint32_t c0 = static_cast<uint32_t>(c), c1 = static_cast<uint32_t>(c >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = static_cast<uint64_t>(c2) * kPhiloxRoundB, pa = static_cast<uint64_t>(c0) * kPhiloxRoundA;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0, n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const uint32_t words[4] = {c0, c1, c2, c3};
  for (int pair = 0; pair < 2; ++pair) {
    const float u1 = std::max(1e-7f, uniform(words[2 * pair])), u2 = uniform(words[2 * pair + 1]);
    const float r = std::sqrt(-2.0f * std::log(u1)), theta = 6.283185307179586f * u2;
    out[2 * pair] = r * std::cos(theta);
    out[2 * pair + 1] = r * std::sin(theta);
  }
}

#if FASTDDPM_AVX2
// log(x) for normal x > 0 (Cephes logf: frexp, then a degree-9 polynomial of the mantissa − 1; ~1 ulp).
inline __m256 log_ps(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256i xi = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  // m in [0.5, 1): below √½ use 2m − 1 and e − 1, else m − 1
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  const __m256 tmp = _mm256_and_ps(m, small);
  m = _mm256_sub_ps(m, one);
  e = _mm256_sub_ps(e, _mm256_and_ps(one, small));
  m = _mm256_add_ps(m, tmp);
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
}

// sin and cos of x in [0, 8192) (Cephes sinf/cosf: reduction by π/4 in three parts, two polynomials).
inline void sincos_ps(__m256 x, __m256* s, __m256* c) {
  __m256i j = _mm256_cvttps_epi32(_mm256_mul_ps(x, _mm256_set1_ps(1.27323954473516f)));
  j = _mm256_and_si256(_mm256_add_epi32(j, _mm256_set1_epi32(1)), _mm256_set1_epi32(~1));
  const __m256 y = _mm256_cvtepi32_ps(j);
  const __m256 sin_sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(j, _mm256_set1_epi32(4)), 29));
  const __m256 cos_sign = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_andnot_si256(_mm256_sub_epi32(j, _mm256_set1_epi32(2)), _mm256_set1_epi32(4)), 29));
  const __m256 sin_poly = _mm256_castsi256_ps(
      _mm256_cmpeq_epi32(_mm256_and_si256(j, _mm256_set1_epi32(2)), _mm256_setzero_si256()));
  x = _mm256_fnmadd_ps(y, _mm256_set1_ps(0.78515625f), x);
  x = _mm256_fnmadd_ps(y, _mm256_set1_ps(2.4187564849853515625e-4f), x);
  x = _mm256_fnmadd_ps(y, _mm256_set1_ps(3.77489497744594108e-8f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 yc = _mm256_set1_ps(2.443315711809948e-5f);
  yc = _mm256_fmadd_ps(yc, z, _mm256_set1_ps(-1.388731625493765e-3f));
  yc = _mm256_fmadd_ps(yc, z, _mm256_set1_ps(4.166664568298827e-2f));
  yc = _mm256_mul_ps(_mm256_mul_ps(yc, z), z);
  yc = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), yc);
  yc = _mm256_add_ps(yc, _mm256_set1_ps(1.0f));
  __m256 ys = _mm256_set1_ps(-1.9515295891e-4f);
  ys = _mm256_fmadd_ps(ys, z, _mm256_set1_ps(8.3321608736e-3f));
  ys = _mm256_fmadd_ps(ys, z, _mm256_set1_ps(-1.6666654611e-1f));
  ys = _mm256_fmadd_ps(_mm256_mul_ps(ys, z), x, x);
  *s = _mm256_xor_ps(_mm256_blendv_ps(yc, ys, sin_poly), sin_sign);
  *c = _mm256_xor_ps(_mm256_blendv_ps(ys, yc, sin_poly), cos_sign);
}

inline void mulhilo(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // 64-bit products of lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // of lanes 1, 3, 5, 7
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

inline __m256 uniform_ps(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));  // negative → ~x
  return _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(4.6566127342e-10f));
}

// Box–Muller on the four Philox words of 8 counters, stored as their 32 normals in element order.
inline void box_muller_store(__m256i w0, __m256i w1, __m256i w2, __m256i w3, float* out) {
  const __m256 two_pi = _mm256_set1_ps(6.283185307179586f), minus_two = _mm256_set1_ps(-2.0f);
  const __m256 tiny = _mm256_set1_ps(1e-7f);
  const __m256 r01 = _mm256_sqrt_ps(_mm256_mul_ps(minus_two, log_ps(_mm256_max_ps(uniform_ps(w0), tiny))));
  const __m256 r23 = _mm256_sqrt_ps(_mm256_mul_ps(minus_two, log_ps(_mm256_max_ps(uniform_ps(w2), tiny))));
  __m256 s01, co01, s23, co23;
  sincos_ps(_mm256_mul_ps(two_pi, uniform_ps(w1)), &s01, &co01);
  sincos_ps(_mm256_mul_ps(two_pi, uniform_ps(w3)), &s23, &co23);
  const __m256 n0 = _mm256_mul_ps(r01, co01), n1 = _mm256_mul_ps(r01, s01);
  const __m256 n2 = _mm256_mul_ps(r23, co23), n3 = _mm256_mul_ps(r23, s23);
  // transpose [lane][counter] → [counter][lane]
  const __m256 ab_lo = _mm256_unpacklo_ps(n0, n1), ab_hi = _mm256_unpackhi_ps(n0, n1);
  const __m256 cd_lo = _mm256_unpacklo_ps(n2, n3), cd_hi = _mm256_unpackhi_ps(n2, n3);
  const __m256 t0 = _mm256_shuffle_ps(ab_lo, cd_lo, _MM_SHUFFLE(1, 0, 1, 0));  // counters 0 | 4
  const __m256 t1 = _mm256_shuffle_ps(ab_lo, cd_lo, _MM_SHUFFLE(3, 2, 3, 2));  // 1 | 5
  const __m256 t2 = _mm256_shuffle_ps(ab_hi, cd_hi, _MM_SHUFFLE(1, 0, 1, 0));  // 2 | 6
  const __m256 t3 = _mm256_shuffle_ps(ab_hi, cd_hi, _MM_SHUFFLE(3, 2, 3, 2));  // 3 | 7
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(t0, t1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(t2, t3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(t0, t1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(t2, t3, 0x31));
}

// The round keys of a seed, broadcast: (k0 + r·A, k1 + r·B) for rounds r = 0..9.
struct RoundKeys {
  __m256i k0[10], k1[10];
  explicit RoundKeys(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r, a += kPhiloxKeyA, b += kPhiloxKeyB) {
      k0[r] = _mm256_set1_epi32(static_cast<int>(a));
      k1[r] = _mm256_set1_epi32(static_cast<int>(b));
    }
  }
};

// Counter words (lo, hi) of counters c .. c + 7.
inline void counter_words(uint64_t c, __m256i* lo, __m256i* hi) {
  if (static_cast<uint32_t>(c) <= 0xFFFFFFFFu - 7u) {  // no carry into the high word within the 8
    *lo = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(c))),
                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    *hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(c >> 32)));
    return;
  }
  alignas(32) uint32_t l[8], h[8];
  for (int k = 0; k < 8; ++k) {
    l[k] = static_cast<uint32_t>(c + k);
    h[k] = static_cast<uint32_t>((c + k) >> 32);
  }
  *lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(l));
  *hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(h));
}

// The 64 normals of counters c .. c + 15, in element order: two independent 8-counter Philox chains
// interleaved, so that the multiplies of one hide the latency of the other.
inline void philox_normal64(const RoundKeys& keys, uint64_t c, float* out) {
  __m256i a0, a1, b0, b1;
  counter_words(c, &a0, &a1);
  counter_words(c + 8, &b0, &b1);
  __m256i a2 = _mm256_setzero_si256(), a3 = a2, b2 = a2, b3 = a2;
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i mb = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int round = 0; round < 10; ++round) {
    __m256i hi_a, lo_a, hi_b, lo_b, hi_c, lo_c, hi_d, lo_d;
    mulhilo(a2, mb, &hi_b, &lo_b);
    mulhilo(a0, ma, &hi_a, &lo_a);
    mulhilo(b2, mb, &hi_d, &lo_d);
    mulhilo(b0, ma, &hi_c, &lo_c);
    a0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, a1), keys.k0[round]);
    a1 = lo_b;
    a2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, a3), keys.k1[round]);
    a3 = lo_a;
    b0 = _mm256_xor_si256(_mm256_xor_si256(hi_d, b1), keys.k0[round]);
    b1 = lo_d;
    b2 = _mm256_xor_si256(_mm256_xor_si256(hi_c, b3), keys.k1[round]);
    b3 = lo_c;
  }
  box_muller_store(a0, a1, a2, a3, out);
  box_muller_store(b0, b1, b2, b3, out + 32);
}
#endif

// n normals starting at counter c (element 0 = lane 0 of c) into out, which has room for n rounded up to 64.
inline void normals(uint64_t seed, uint64_t c, int64_t n, float* out) {
#if FASTDDPM_AVX2
  const RoundKeys keys(seed);
  for (int64_t i = 0; i < n; i += 64) {
    philox_normal64(keys, c + static_cast<uint64_t>(i / 4), out + i);
  }
#else
  for (int64_t i = 0; i < n; i += 4) {
    philox_normal4(seed, c + static_cast<uint64_t>(i / 4), out + i);
  }
#endif
}

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
  at::parallel_for(0, B * chunks, std::max<int64_t>(1, kGrainElements / kChunk), [&](int64_t begin, int64_t end) {
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
template <typename scalar_t, int kObjective, bool kDdim>
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
        if constexpr (kObjective == 0) {  // ε: x̂_0 = √(1/ᾱ) x_t − √(1/ᾱ − 1) ε
          raw = r0 * xi - r1 * o;
        } else if constexpr (kObjective == 1) {
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
          } else if constexpr (kObjective == 0) {
            eps = o;
          } else if constexpr (kObjective == 1) {
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

template <typename scalar_t>
void step_dispatch(const StepArgs& args) {
  switch (args.objective * 2 + (args.ddim ? 1 : 0)) {
    case 0: step_typed<scalar_t, 0, false>(args); break;
    case 1: step_typed<scalar_t, 0, true>(args); break;
    case 2: step_typed<scalar_t, 1, false>(args); break;
    case 3: step_typed<scalar_t, 1, true>(args); break;
    case 4: step_typed<scalar_t, 2, false>(args); break;
    default: step_typed<scalar_t, 2, true>(args); break;
  }
}

void step(const StepArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "reverse_step",
                                  [&] { step_dispatch<scalar_t>(args); });
}

const Kernels table = {&q_sample_philox, &loss_forward, &loss_backward, &step, &normals};
