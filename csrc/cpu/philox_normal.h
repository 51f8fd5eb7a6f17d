// The noise of the fused CPU kernels: Philox 4x32-10 and Box–Muller, as the Triton kernels draw it
// (kernels/noise.py, fastddpm.reference.philox_normal). Element i of sample b takes lane i % 4 of counter
// c = offset + b·⌈N/4⌉ + ⌊i/4⌋ under key seed (counter words (lo32 c, hi32 c, 0, 0), key words seed lo/hi);
// each word is mapped to [0, 1) as Triton's uint_to_uniform_float, then Box–Muller on lanes (0, 1) and (2, 3):
// u1 = max(1e-7, u1), θ = 2π·u2, r = √(−2 log u1) → (r cos θ, r sin θ). One Philox evaluation per 4 elements.
//
// Included by fused_kernels.h inside a namespace, twice: with FASTDDPM_AVX2 = 1 (explicit AVX2: 8 counters a
// vector) and 0 (scalar). No include guard, and nothing from torch: tools/draw_bench.cpp times it on its own.

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
