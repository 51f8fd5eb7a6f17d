// Fused GroupNorm + SiLU on CUDA: forward and backward, fp32/fp16/bf16 in, fp32 math, plain CUDA.
//
// Forward (GroupNorm: Wu & He 2018, eq. 1-4; SiLU: Elfwing et al. 2018, x·σ(x)), per group (n, g) of
// M = D·HW elements and channel c of that group:
//   μ = mean(x),  σ² = mean((x − μ)²) (biased),  rstd = 1 / sqrt(σ² + eps)
//   z = (x − μ)·rstd,  h = γ_c·z + β_c,  y = h·σ(h) = h / (1 + exp(−h))
// Backward, with z and h recomputed from x, μ and rstd:
//   dh = dy·σ(h)·(1 + h·(1 − σ(h)))                    (SiLU')
//   dβ_c = Σ_{n,hw} dh,   dγ_c = Σ_{n,hw} dh·z
//   dz = γ_c·dh,   dx = rstd·(dz − mean_g(dz) − z·mean_g(dz·z))
// where mean_g(dz) = Σ_{c∈g} γ_c·Σ_hw dh / M and mean_g(dz·z) = Σ_{c∈g} γ_c·Σ_hw dh·z / M, so one pass
// of per-(n, c) sums A = Σ_hw dh and B = Σ_hw dh·z gives dβ, dγ and both group means.
//
// Kernels (kThreads threads a block; every reduction in a fixed order, no float atomics):
//   NCHW (a group is one contiguous run of M elements)
//     gn_stats_nchw       grid (N·G, S): Welford over a 1/S share of a group; S > 1 only when N·G is
//                         below twice the SM count. S == 1 writes mean/rstd, else a Welford partial.
//     gn_stats_combine    one warp per group merges its partials (Chan et al.) into mean/rstd.
//     gn_silu_fwd_nchw    rows (n, c) of HW elements, 2^k threads a row, several rows a block.
//     gn_bwd_sums_nchw    per-row A, B (or per-(row, split) partials), same row mapping.
//     gn_bwd_dx_nchw      dx, same row mapping.
//   NHWC (a group is D consecutive channels of each of HW rows of C)
//     gn_stats_nhwc       grid (N·R, column tiles): a thread owns one vector of channels and walks
//                         rows; partials per (n, row chunk, vector column), merged by gn_stats_combine.
//     gn_silu_fwd_nhwc, gn_bwd_sums_nhwc, gn_bwd_dx_nhwc: the same mapping.
//   gn_bwd_reduce_partials  sums the split partials of A, B in order.
//   gn_bwd_group_coefs      per group: the two mean_g terms; per channel: dγ, dβ (sums over n in order).
// Loads and stores move 16 bytes (V = 4 fp32 or 8 fp16/bf16 elements) when every pointer is aligned to
// that and the row length (HW in NCHW, D in NHWC; M for the NCHW statistics) is a multiple of V, else 8,
// 4 or 2 bytes, else one element.
#include "group_norm_silu.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

namespace fastddpm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Most splits of one reduction (NCHW statistics split S, NHWC row chunks R, NCHW column splits Y).
constexpr int64_t kMaxSplit = 128;
// Least work, in vectors a thread, before a reduction is split further.
constexpr int64_t kMinVectorsPerThread = 4;
// Blocks that fill the device for the streaming kernels: this many per SM.
constexpr int64_t kBlocksPerSm = 4;
// The NCHW statistics split each group's reduction when there are fewer groups than this many per SM.
constexpr int64_t kSplitBelowBlocksPerSm = 2;
// A grid's x and y limits.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

// ---------------------------------------------------------------------------------------------------
// Element conversions and vector memory access.

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// V elements moved as one aligned access of V * sizeof(T) bytes (2 to 16), through the integer type of
// that size: ld.global.nc.v4.u32 and st.global.v4.u32 for 16 bytes. (A struct of V elements is not
// enough: the compiler splits some of its stores into scalar ones.) Loads go through the read-only path:
// no kernel here writes what it loads.
template <int Bytes>
struct RawOf;
template <>
struct RawOf<2> {
  using type = unsigned short;
};
template <>
struct RawOf<4> {
  using type = unsigned int;
};
template <>
struct RawOf<8> {
  using type = uint2;
};
template <>
struct RawOf<16> {
  using type = uint4;
};

template <typename T, int V>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
  using Raw = typename RawOf<sizeof(T) * V>::type;
  const Raw raw = __ldg(reinterpret_cast<const Raw*>(p));
  T vals[V];
  memcpy(vals, &raw, sizeof(Raw));
#pragma unroll
  for (int k = 0; k < V; ++k) {
    out[k] = to_float(vals[k]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  using Raw = typename RawOf<sizeof(T) * V>::type;
  T vals[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    vals[k] = from_float<T>(in[k]);
  }
  Raw raw;
  memcpy(&raw, vals, sizeof(Raw));
  __stwb(reinterpret_cast<Raw*>(p), raw);
}

// σ(h) = 1 / (1 + exp(−h)). For h < −87 exp(−h) overflows to inf and σ(h) comes out 0 (the true value
// is below 1e-38); a NaN h gives NaN.
__device__ __forceinline__ float sigmoid(float h) { return __fdividef(1.f, 1.f + __expf(-h)); }

// ---------------------------------------------------------------------------------------------------
// Welford statistics of a set of n values: mean and m2 = Σ (x − mean)². Two sets merge by Chan et al.'s
// formula; merging with an empty set (n = 0) returns the other set exactly.

struct Welford {
  float mean;
  float m2;
  float n;
};

__device__ __forceinline__ Welford merge(const Welford& a, const Welford& b) {
  const float n = a.n + b.n;
  const float wb = n > 0.f ? b.n / n : 0.f;
  const float delta = b.mean - a.mean;
  return {fmaf(delta, wb, a.mean), a.m2 + b.m2 + delta * delta * a.n * wb, n};
}

// The statistics of one vector of V values, two-pass in registers.
template <int V>
__device__ __forceinline__ Welford welford_of(const float (&v)[V]) {
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    sum += v[k];
  }
  const float mean = sum * (1.f / V);
  float m2 = 0.f;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float d = v[k] - mean;
    m2 = fmaf(d, d, m2);
  }
  return {mean, m2, static_cast<float>(V)};
}

__device__ __forceinline__ Welford shfl_down(const Welford& w, int offset) {
  return {__shfl_down_sync(0xffffffffu, w.mean, offset), __shfl_down_sync(0xffffffffu, w.m2, offset),
          __shfl_down_sync(0xffffffffu, w.n, offset)};
}

// Merges the 32 lanes' statistics in a fixed tree; the result is lane 0's. All 32 lanes must call it.
__device__ __forceinline__ Welford warp_merge(Welford w) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    w = merge(w, shfl_down(w, offset));
  }
  return w;
}

// Merges the block's statistics; the result is thread 0's. All kThreads threads must call it.
__device__ __forceinline__ Welford block_merge(Welford w) {
  __shared__ Welford warp_results[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  w = warp_merge(w);
  if (lane == 0) {
    warp_results[warp] = w;
  }
  __syncthreads();
  if (warp == 0) {
    w = lane < kWarps ? warp_results[lane] : Welford{0.f, 0.f, 0.f};
    w = warp_merge(w);
  }
  return w;
}

__device__ __forceinline__ float rstd_of(const Welford& w, float eps) {
  return 1.f / sqrtf(w.m2 / w.n + eps);
}

// ---------------------------------------------------------------------------------------------------
// Statistics.

// Block (ng, s) reduces vectors [s·chunk, (s+1)·chunk) of group ng = n·G + g, which is the contiguous run
// x[ng·M, (ng+1)·M) in NCHW. One split writes mean/rstd; several write Welford partials, laid out
// [N][S][G] (the combine kernel's [N][R][K] with R = S, K = G, one column a group).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gn_stats_nchw(const T* __restrict__ x, int64_t G, int64_t group_vecs, int64_t chunk_vecs, float eps,
                  float* __restrict__ mean, float* __restrict__ rstd, Welford* __restrict__ partials) {
  const int64_t ng = blockIdx.x;
  const int64_t s = blockIdx.y;
  const T* group = x + ng * group_vecs * V;
  const int64_t end = min64(group_vecs, (s + 1) * chunk_vecs);
  Welford w{0.f, 0.f, 0.f};
#pragma unroll 4
  for (int64_t i = s * chunk_vecs + threadIdx.x; i < end; i += kThreads) {
    float v[V];
    load<T, V>(group + i * V, v);
    w = merge(w, welford_of<V>(v));
  }
  w = block_merge(w);
  if (threadIdx.x == 0) {
    if (gridDim.y == 1) {
      mean[ng] = w.mean;
      rstd[ng] = rstd_of(w, eps);
    } else {
      const int64_t n = ng / G;
      const int64_t g = ng - n * G;
      partials[(n * gridDim.y + s) * G + g] = w;
    }
  }
}

// NHWC: block (n·R + r, tile) covers rows [r·rows_per_chunk, (r+1)·rows_per_chunk) of sample n and vector
// columns [tile·CT, (tile+1)·CT). Thread (tx, ty) = (threadIdx.x % CT, threadIdx.x / CT) owns vector column
// vc = tile·CT + tx (channels vc·V .. vc·V+V−1, all in one group since D % V == 0) and every RT-th row.
// The RT row lanes merge in a fixed tree; partials are laid out [N][R][CV].
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gn_stats_nhwc(const T* __restrict__ x, int64_t HW, int64_t CV, int CT, int RT, int rt_tree,
                  int64_t rows_per_chunk, int64_t R, Welford* __restrict__ partials) {
  __shared__ Welford lanes[kThreads];
  const int64_t n = blockIdx.x / R;
  const int64_t r = blockIdx.x - n * R;
  const int tx = threadIdx.x % CT;
  const int ty = threadIdx.x / CT;
  const int64_t vc = static_cast<int64_t>(blockIdx.y) * CT + tx;
  const int64_t C = CV * V;
  Welford w{0.f, 0.f, 0.f};
  if (ty < RT && vc < CV) {
    const T* column = x + n * HW * C + vc * V;
    const int64_t end = min64(HW, (r + 1) * rows_per_chunk);
#pragma unroll 4
    for (int64_t row = r * rows_per_chunk + ty; row < end; row += RT) {
      float v[V];
      load<T, V>(column + row * C, v);
      w = merge(w, welford_of<V>(v));
    }
  }
  lanes[threadIdx.x] = w;
  __syncthreads();
  // rt_tree: the power of two ≥ RT, halved. Step `stride` folds lanes [stride, 2·stride) ∩ [0, RT) into
  // [0, stride); the reads and writes of one step never touch the same slot.
  for (int stride = rt_tree; stride > 0; stride >>= 1) {
    if (ty < stride && ty + stride < RT && vc < CV) {
      lanes[threadIdx.x] = merge(lanes[threadIdx.x], lanes[threadIdx.x + stride * CT]);
    }
    __syncthreads();
  }
  if (ty == 0 && vc < CV) {
    partials[(n * R + r) * CV + vc] = lanes[threadIdx.x];
  }
}

// One warp per group ng = n·G + g merges the partials [n][r][g·KG + k] for r < R, k < KG (partials laid
// out [N][R][K]) in a fixed order: lane l takes p = l, l+32, ... of p = r·KG + k, then the warp's tree.
__global__ void __launch_bounds__(kThreads)
    gn_stats_combine(const Welford* __restrict__ partials, int64_t NG, int64_t G, int64_t R, int64_t K,
                     int64_t KG, float eps, float* __restrict__ mean, float* __restrict__ rstd) {
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (ng >= NG) {
    return;  // the whole warp: ng is the same in all its lanes
  }
  const int lane = threadIdx.x & 31;
  const int64_t n = ng / G;
  const int64_t g = ng - n * G;
  Welford w{0.f, 0.f, 0.f};
  for (int64_t p = lane; p < R * KG; p += 32) {
    const int64_t r = p / KG;
    const int64_t k = p - r * KG;
    w = merge(w, partials[(n * R + r) * K + g * KG + k]);
  }
  w = warp_merge(w);
  if (lane == 0) {
    mean[ng] = w.mean;
    rstd[ng] = rstd_of(w, eps);
  }
}

// ---------------------------------------------------------------------------------------------------
// Per-channel parameters.

struct ChannelParams {
  float mean, rstd, gamma, beta;
};

__device__ __forceinline__ ChannelParams channel_params(const float* __restrict__ mean,
                                                        const float* __restrict__ rstd,
                                                        const float* __restrict__ weight,
                                                        const float* __restrict__ bias, int64_t ng, int64_t c) {
  return {mean[ng], rstd[ng], weight != nullptr ? weight[c] : 1.f, bias != nullptr ? bias[c] : 0.f};
}

// The V channels vc·V .. vc·V + V − 1 of one sample in the NHWC kernels: their group's mean and rstd (group
// ng), their affine parameters (1 and 0 without weight or bias).
template <int V>
struct ChannelVector {
  float mean, rstd, gamma[V], beta[V];
  __device__ __forceinline__ ChannelVector(const float* __restrict__ mean_, const float* __restrict__ rstd_,
                                           const float* __restrict__ weight, const float* __restrict__ bias,
                                           int64_t ng, int64_t vc)
      : mean(mean_[ng]), rstd(rstd_[ng]) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      gamma[k] = weight != nullptr ? weight[vc * V + k] : 1.f;
      beta[k] = bias != nullptr ? bias[vc * V + k] : 0.f;
    }
  }
};

// y = SiLU(γ·(x − μ)·rstd + β)
__device__ __forceinline__ float gn_silu(float x, float mean, float rstd, float gamma, float beta) {
  const float h = fmaf((x - mean) * rstd, gamma, beta);
  return __fdividef(h, 1.f + __expf(-h));
}

// The NCHW row mapping: rows (n, c) of HWV vectors; 2^tpr_log2 threads a row, kThreads >> tpr_log2 rows a
// block (blockIdx.x), gridDim.y blocks along a row.
struct RowIndex {
  int64_t row;  // n·C + c
  int j;        // thread within the row
  int tpr;      // threads per row
};

__device__ __forceinline__ RowIndex row_index(int tpr_log2) {
  const int64_t rows_per_block = kThreads >> tpr_log2;
  return {static_cast<int64_t>(blockIdx.x) * rows_per_block + (threadIdx.x >> tpr_log2),
          static_cast<int>(threadIdx.x & ((1u << tpr_log2) - 1)), 1 << tpr_log2};
}

// ---------------------------------------------------------------------------------------------------
// Forward: y.

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gn_silu_fwd_nchw(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ mean,
                     const float* __restrict__ rstd, const float* __restrict__ weight,
                     const float* __restrict__ bias, int64_t NC, int64_t C, int64_t D, int64_t HWV, int tpr_log2) {
  const RowIndex ri = row_index(tpr_log2);
  if (ri.row >= NC) {
    return;
  }
  const int64_t n = ri.row / C;
  const int64_t c = ri.row - n * C;
  const ChannelParams p = channel_params(mean, rstd, weight, bias, n * (C / D) + c / D, c);
  const T* xr = x + ri.row * HWV * V;
  T* yr = y + ri.row * HWV * V;
  const int64_t step = static_cast<int64_t>(ri.tpr) * gridDim.y;
#pragma unroll 4
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * ri.tpr + ri.j; i < HWV; i += step) {
    float v[V];
    load<T, V>(xr + i * V, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      v[k] = gn_silu(v[k], p.mean, p.rstd, p.gamma, p.beta);
    }
    store<T, V>(yr + i * V, v);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gn_silu_fwd_nhwc(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ mean,
                     const float* __restrict__ rstd, const float* __restrict__ weight,
                     const float* __restrict__ bias, int64_t HW, int64_t CV, int64_t DV, int64_t G, int CT,
                     int RT, int64_t rows_per_chunk, int64_t R) {
  const int64_t n = blockIdx.x / R;
  const int64_t r = blockIdx.x - n * R;
  const int tx = threadIdx.x % CT;
  const int ty = threadIdx.x / CT;
  const int64_t vc = static_cast<int64_t>(blockIdx.y) * CT + tx;
  if (ty >= RT || vc >= CV) {
    return;
  }
  const int64_t C = CV * V;
  const ChannelVector<V> p(mean, rstd, weight, bias, n * G + vc / DV, vc);
  const int64_t offset = n * HW * C + vc * V;
  const int64_t end = min64(HW, (r + 1) * rows_per_chunk);
#pragma unroll 4
  for (int64_t row = r * rows_per_chunk + ty; row < end; row += RT) {
    float v[V];
    load<T, V>(x + offset + row * C, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      v[k] = gn_silu(v[k], p.mean, p.rstd, p.gamma[k], p.beta[k]);
    }
    store<T, V>(y + offset + row * C, v);
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward.

// dh = dy·SiLU'(h) with h recomputed; returns dh and sets z.
__device__ __forceinline__ float silu_grad(float dy, float x, float mean, float rstd, float gamma, float beta,
                                           float& z) {
  z = (x - mean) * rstd;
  const float h = fmaf(z, gamma, beta);
  const float s = sigmoid(h);
  return dy * s * fmaf(h, 1.f - s, 1.f);
}

// Per-row sums A = Σ dh and B = Σ dh·z over the row's share (blockIdx.y of gridDim.y) of its HW elements,
// a fixed tree over the row's threads; written to sum_dh/sum_dhz [gridDim.y][NC].
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gn_bwd_sums_nchw(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
                     const float* __restrict__ rstd, const float* __restrict__ weight,
                     const float* __restrict__ bias, int64_t NC, int64_t C, int64_t D, int64_t HWV, int tpr_log2,
                     float* __restrict__ sum_dh, float* __restrict__ sum_dhz) {
  __shared__ float sa[kThreads];
  __shared__ float sb[kThreads];
  const RowIndex ri = row_index(tpr_log2);
  float a = 0.f, b = 0.f;
  if (ri.row < NC) {
    const int64_t n = ri.row / C;
    const int64_t c = ri.row - n * C;
    const ChannelParams p = channel_params(mean, rstd, weight, bias, n * (C / D) + c / D, c);
    const T* dyr = dy + ri.row * HWV * V;
    const T* xr = x + ri.row * HWV * V;
    const int64_t step = static_cast<int64_t>(ri.tpr) * gridDim.y;
#pragma unroll 4
    for (int64_t i = static_cast<int64_t>(blockIdx.y) * ri.tpr + ri.j; i < HWV; i += step) {
      float gv[V], xv[V];
      load<T, V>(dyr + i * V, gv);
      load<T, V>(xr + i * V, xv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        float z;
        const float dh = silu_grad(gv[k], xv[k], p.mean, p.rstd, p.gamma, p.beta, z);
        a += dh;
        b = fmaf(dh, z, b);
      }
    }
  }
  sa[threadIdx.x] = a;
  sb[threadIdx.x] = b;
  __syncthreads();
  // A row's threads are consecutive: fold [j, j + stride) pairs within the row.
  for (int stride = ri.tpr >> 1; stride > 0; stride >>= 1) {
    if (ri.j < stride) {
      sa[threadIdx.x] += sa[threadIdx.x + stride];
      sb[threadIdx.x] += sb[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (ri.j == 0 && ri.row < NC) {
    sum_dh[static_cast<int64_t>(blockIdx.y) * NC + ri.row] = sa[threadIdx.x];
    sum_dhz[static_cast<int64_t>(blockIdx.y) * NC + ri.row] = sb[threadIdx.x];
  }
}

// NHWC: the thread mapping of gn_stats_nhwc; per-channel sums over the block's rows, RT row lanes folded in
// a fixed tree, written to sum_dh/sum_dhz [N][R][C].
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 2)
    gn_bwd_sums_nhwc(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
                     const float* __restrict__ rstd, const float* __restrict__ weight,
                     const float* __restrict__ bias, int64_t HW, int64_t CV, int64_t DV, int64_t G, int CT,
                     int RT, int rt_tree, int64_t rows_per_chunk, int64_t R, float* __restrict__ sum_dh,
                     float* __restrict__ sum_dhz) {
  __shared__ float sa[kThreads * V];
  __shared__ float sb[kThreads * V];
  const int64_t n = blockIdx.x / R;
  const int64_t r = blockIdx.x - n * R;
  const int tx = threadIdx.x % CT;
  const int ty = threadIdx.x / CT;
  const int64_t vc = static_cast<int64_t>(blockIdx.y) * CT + tx;
  const int64_t C = CV * V;
  float a[V], b[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    a[k] = 0.f;
    b[k] = 0.f;
  }
  if (ty < RT && vc < CV) {
    const ChannelVector<V> p(mean, rstd, weight, bias, n * G + vc / DV, vc);
    const int64_t offset = n * HW * C + vc * V;
    const int64_t end = min64(HW, (r + 1) * rows_per_chunk);
#pragma unroll 4
    for (int64_t row = r * rows_per_chunk + ty; row < end; row += RT) {
      float gv[V], xv[V];
      load<T, V>(dy + offset + row * C, gv);
      load<T, V>(x + offset + row * C, xv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        float z;
        const float dh = silu_grad(gv[k], xv[k], p.mean, p.rstd, p.gamma[k], p.beta[k], z);
        a[k] += dh;
        b[k] = fmaf(dh, z, b[k]);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    sa[threadIdx.x * V + k] = a[k];
    sb[threadIdx.x * V + k] = b[k];
  }
  __syncthreads();
  for (int stride = rt_tree; stride > 0; stride >>= 1) {
    if (ty < stride && ty + stride < RT && vc < CV) {
      const int other = threadIdx.x + stride * CT;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        sa[threadIdx.x * V + k] += sa[other * V + k];
        sb[threadIdx.x * V + k] += sb[other * V + k];
      }
    }
    __syncthreads();
  }
  if (ty == 0 && vc < CV) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      sum_dh[(n * R + r) * C + vc * V + k] = sa[threadIdx.x * V + k];
      sum_dhz[(n * R + r) * C + vc * V + k] = sb[threadIdx.x * V + k];
    }
  }
}

// A[n·C + c] = Σ_{r<R} pa[n·stride_n + r·stride_r + c], in order of r; B likewise.
__global__ void __launch_bounds__(kThreads)
    gn_bwd_reduce_partials(const float* __restrict__ pa, const float* __restrict__ pb, int64_t NC, int64_t C,
                           int64_t R, int64_t stride_n, int64_t stride_r, float* __restrict__ A,
                           float* __restrict__ B) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= NC) {
    return;
  }
  const int64_t n = i / C;
  const int64_t base = n * stride_n + (i - n * C);
  float a = 0.f, b = 0.f;
  for (int64_t r = 0; r < R; ++r) {
    a += pa[base + r * stride_r];
    b += pb[base + r * stride_r];
  }
  A[i] = a;
  B[i] = b;
}

// Threads [0, N·G): group ng's terms k1 = rstd·mean_g(dz), k2 = rstd·mean_g(dz·z), so that
// dx = rstd·γ_c·dh − k1 − z·k2. Threads [N·G, N·G + C) when grad_weight or grad_bias is wanted: channel c's
// dγ = Σ_n B[n][c] and dβ = Σ_n A[n][c]. Every sum runs in order.
__global__ void __launch_bounds__(kThreads)
    gn_bwd_group_coefs(const float* __restrict__ A, const float* __restrict__ B, const float* __restrict__ rstd,
                       const float* __restrict__ weight, int64_t N, int64_t C, int64_t G, float inv_M,
                       float* __restrict__ k1, float* __restrict__ k2, float* __restrict__ grad_weight,
                       float* __restrict__ grad_bias) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t NG = N * G;
  if (i < NG) {
    const int64_t n = i / G;
    const int64_t D = C / G;
    const int64_t c0 = (i - n * G) * D;
    float sdz = 0.f, sdzz = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float gamma = weight != nullptr ? weight[c0 + d] : 1.f;
      sdz = fmaf(gamma, A[n * C + c0 + d], sdz);
      sdzz = fmaf(gamma, B[n * C + c0 + d], sdzz);
    }
    const float scale = rstd[i] * inv_M;
    k1[i] = scale * sdz;
    k2[i] = scale * sdzz;
  } else if (i < NG + C && (grad_weight != nullptr || grad_bias != nullptr)) {
    const int64_t c = i - NG;
    float gw = 0.f, gb = 0.f;
    for (int64_t n = 0; n < N; ++n) {
      gw += B[n * C + c];
      gb += A[n * C + c];
    }
    if (grad_weight != nullptr) {
      grad_weight[c] = gw;
    }
    if (grad_bias != nullptr) {
      grad_bias[c] = gb;
    }
  }
}

__device__ __forceinline__ float gn_silu_dx(float dy, float x, float mean, float rstd, float gamma, float beta,
                                            float k1, float k2) {
  float z;
  const float dh = silu_grad(dy, x, mean, rstd, gamma, beta, z);
  return fmaf(rstd * gamma, dh, -fmaf(z, k2, k1));
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gn_bwd_dx_nchw(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
                   const float* __restrict__ rstd, const float* __restrict__ weight, const float* __restrict__ bias,
                   const float* __restrict__ k1, const float* __restrict__ k2, int64_t NC, int64_t C, int64_t D,
                   int64_t HWV, int tpr_log2, T* __restrict__ dx) {
  const RowIndex ri = row_index(tpr_log2);
  if (ri.row >= NC) {
    return;
  }
  const int64_t n = ri.row / C;
  const int64_t c = ri.row - n * C;
  const int64_t ng = n * (C / D) + c / D;
  const ChannelParams p = channel_params(mean, rstd, weight, bias, ng, c);
  const float c1 = k1[ng], c2 = k2[ng];
  const T* dyr = dy + ri.row * HWV * V;
  const T* xr = x + ri.row * HWV * V;
  T* dxr = dx + ri.row * HWV * V;
  const int64_t step = static_cast<int64_t>(ri.tpr) * gridDim.y;
#pragma unroll 4
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * ri.tpr + ri.j; i < HWV; i += step) {
    float gv[V], xv[V];
    load<T, V>(dyr + i * V, gv);
    load<T, V>(xr + i * V, xv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      gv[k] = gn_silu_dx(gv[k], xv[k], p.mean, p.rstd, p.gamma, p.beta, c1, c2);
    }
    store<T, V>(dxr + i * V, gv);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gn_bwd_dx_nhwc(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
                   const float* __restrict__ rstd, const float* __restrict__ weight, const float* __restrict__ bias,
                   const float* __restrict__ k1, const float* __restrict__ k2, int64_t HW, int64_t CV, int64_t DV,
                   int64_t G, int CT, int RT, int64_t rows_per_chunk, int64_t R, T* __restrict__ dx) {
  const int64_t n = blockIdx.x / R;
  const int64_t r = blockIdx.x - n * R;
  const int tx = threadIdx.x % CT;
  const int ty = threadIdx.x / CT;
  const int64_t vc = static_cast<int64_t>(blockIdx.y) * CT + tx;
  if (ty >= RT || vc >= CV) {
    return;
  }
  const int64_t C = CV * V;
  const int64_t ng = n * G + vc / DV;
  const ChannelVector<V> p(mean, rstd, weight, bias, ng, vc);
  const float c1 = k1[ng], c2 = k2[ng];
  const int64_t offset = n * HW * C + vc * V;
  const int64_t end = min64(HW, (r + 1) * rows_per_chunk);
#pragma unroll 4
  for (int64_t row = r * rows_per_chunk + ty; row < end; row += RT) {
    float gv[V], xv[V];
    load<T, V>(dy + offset + row * C, gv);
    load<T, V>(x + offset + row * C, xv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      gv[k] = gn_silu_dx(gv[k], xv[k], p.mean, p.rstd, p.gamma[k], p.beta[k], c1, c2);
    }
    store<T, V>(dx + offset + row * C, gv);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side: plans (pure functions of shape, alignment and SM count, so that the workspace size and the
// launches agree and repeated calls reduce in the same order), workspace carving, dispatch.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int elem_size(GnDtype d) { return d == GnDtype::kFloat32 ? 4 : 2; }

// The widest V (elements, at most 16 bytes) such that `len` % V == 0 and every pointer is aligned to
// V elements.
int pick_vec(GnDtype dtype, int64_t len, std::initializer_list<const void*> ptrs) {
  const int size = elem_size(dtype);
  for (int v = 16 / size; v > 1; v /= 2) {
    bool ok = len % v == 0;
    for (const void* p : ptrs) {
      ok = ok && reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(v * size) == 0;
    }
    if (ok) {
      return v;
    }
  }
  return 1;
}

// NCHW statistics: S splits of a group's group_vecs vectors, chunk_vecs each.
struct NchwStatsPlan {
  int vec;
  int64_t group_vecs, chunk_vecs, splits;
};

NchwStatsPlan plan_nchw_stats(const GnShape& s, const void* x, int num_sms) {
  NchwStatsPlan p;
  const int64_t M = s.C / s.G * s.HW;
  p.vec = pick_vec(s.dtype, M, {x});
  p.group_vecs = M / p.vec;
  p.splits = 1;
  const int64_t NG = s.N * s.G;
  // Fewer than kSplitBelowBlocksPerSm blocks an SM cannot keep enough loads in flight to stream from HBM:
  // then each group's reduction is split across blocks, towards kBlocksPerSm blocks an SM.
  if (NG < kSplitBelowBlocksPerSm * num_sms) {
    const int64_t wanted = ceil_div(kBlocksPerSm * num_sms, NG);
    const int64_t most = std::max<int64_t>(1, p.group_vecs / (kThreads * kMinVectorsPerThread));
    p.splits = std::min({wanted, most, kMaxSplit});
  }
  p.chunk_vecs = ceil_div(p.group_vecs, p.splits);
  p.splits = ceil_div(p.group_vecs, p.chunk_vecs);  // no empty split
  return p;
}

// NCHW elementwise row mapping (see row_index).
struct RowPlan {
  int vec, tpr_log2;
  int64_t HWV, blocks_x, blocks_y;
};

RowPlan plan_rows(const GnShape& s, int vec, int num_sms) {
  RowPlan p;
  p.vec = vec;
  p.HWV = s.HW / vec;
  p.tpr_log2 = 0;
  while ((int64_t{1} << p.tpr_log2) < p.HWV && (1 << p.tpr_log2) < kThreads) {
    ++p.tpr_log2;
  }
  const int64_t tpr = int64_t{1} << p.tpr_log2;
  p.blocks_x = ceil_div(s.N * s.C, kThreads / tpr);
  p.blocks_y = 1;
  const int64_t target = kBlocksPerSm * num_sms;
  if (p.blocks_x < target) {  // few long rows: split each row too
    const int64_t most = std::max<int64_t>(1, p.HWV / (tpr * kMinVectorsPerThread));
    p.blocks_y = std::min({ceil_div(target, p.blocks_x), most, kMaxSplit});
  }
  return p;
}

// NHWC mapping: CT vector columns × RT row lanes a block, tiles column tiles, R row chunks a sample.
struct NhwcPlan {
  int vec, CT, RT, rt_tree;
  int64_t CV, DV, tiles, R, rows_per_chunk;
};

NhwcPlan plan_nhwc(const GnShape& s, int vec, int num_sms) {
  NhwcPlan p;
  p.vec = vec;
  p.CV = s.C / vec;
  p.DV = s.C / s.G / vec;
  p.CT = static_cast<int>(std::min<int64_t>(p.CV, kThreads));
  p.RT = kThreads / p.CT;
  p.rt_tree = 1;
  while (p.rt_tree < p.RT) {
    p.rt_tree *= 2;
  }
  p.rt_tree /= 2;
  p.tiles = ceil_div(p.CV, p.CT);
  const int64_t target = kBlocksPerSm * num_sms;
  const int64_t wanted = ceil_div(target, s.N * p.tiles);
  const int64_t most = std::max<int64_t>(1, s.HW / (p.RT * kMinVectorsPerThread));
  p.R = std::max<int64_t>(1, std::min({wanted, most, kMaxSplit}));
  p.rows_per_chunk = ceil_div(s.HW, p.R);
  p.R = ceil_div(s.HW, p.rows_per_chunk);  // no empty chunk
  return p;
}

// Carves 256-byte-aligned arrays out of the workspace; with a null base it only counts the bytes.
struct Carver {
  char* base;
  size_t used = 0;
  template <typename T>
  T* take(int64_t count) {
    used = (used + 255) / 256 * 256;
    T* p = base != nullptr ? reinterpret_cast<T*>(base + used) : nullptr;
    used += static_cast<size_t>(count) * sizeof(T);
    return p;
  }
};

bool grid_ok(int64_t x, int64_t y) { return x >= 1 && x <= kMaxGridX && y >= 1 && y <= kMaxGridY; }

// A grid of x by y blocks, both checked by grid_ok first.
dim3 grid(int64_t x, int64_t y = 1) { return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y)); }

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
cudaError_t with_dtype(GnDtype dtype, F&& f) {
  switch (dtype) {
    case GnDtype::kFloat32:
      return f(TypeTag<float>{});
    case GnDtype::kFloat16:
      return f(TypeTag<__half>{});
    case GnDtype::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename F>
cudaError_t with_vec(int vec, F&& f) {
  switch (vec) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 8:
      if constexpr (sizeof(T) * 8 <= 16) {
        return f(std::integral_constant<int, 8>{});
      }
      break;
  }
  return cudaErrorInvalidValue;
}

bool shape_ok(const GnShape& s) {
  return s.N >= 0 && s.C >= 0 && s.HW >= 0 && s.G >= 1 && s.C % s.G == 0;
}

bool empty(const GnShape& s) { return s.N == 0 || s.C == 0 || s.HW == 0; }

// The forward's workspace (Welford partials), carved or counted.
struct ForwardWorkspace {
  Welford* partials = nullptr;
  size_t bytes = 0;
};

ForwardWorkspace forward_workspace(const GnForwardArgs& a, int num_sms, void* base) {
  const GnShape& s = a.shape;
  Carver carve{static_cast<char*>(base)};
  ForwardWorkspace w;
  if (s.layout == GnLayout::kNCHW) {
    const NchwStatsPlan sp = plan_nchw_stats(s, a.x, num_sms);
    if (sp.splits > 1) {
      w.partials = carve.take<Welford>(s.N * s.G * sp.splits);
    }
  } else {
    const NhwcPlan p = plan_nhwc(s, pick_vec(s.dtype, s.C / s.G, {a.x, a.y}), num_sms);
    w.partials = carve.take<Welford>(s.N * p.R * p.CV);
  }
  w.bytes = carve.used;
  return w;
}

struct BackwardWorkspace {
  float *A = nullptr, *B = nullptr, *pa = nullptr, *pb = nullptr, *k1 = nullptr, *k2 = nullptr;
  size_t bytes = 0;
};

int backward_vec(const GnBackwardArgs& a) {
  const GnShape& s = a.shape;
  const int64_t len = s.layout == GnLayout::kNCHW ? s.HW : s.C / s.G;
  return pick_vec(s.dtype, len, {a.grad_y, a.x, a.grad_x});
}

BackwardWorkspace backward_workspace(const GnBackwardArgs& a, int num_sms, void* base) {
  const GnShape& s = a.shape;
  Carver carve{static_cast<char*>(base)};
  BackwardWorkspace w;
  const int vec = backward_vec(a);
  const int64_t NC = s.N * s.C;
  w.A = carve.take<float>(NC);
  w.B = carve.take<float>(NC);
  const int64_t splits = s.layout == GnLayout::kNCHW ? plan_rows(s, vec, num_sms).blocks_y
                                                      : plan_nhwc(s, vec, num_sms).R;
  if (splits > 1) {
    w.pa = carve.take<float>(splits * NC);
    w.pb = carve.take<float>(splits * NC);
  }
  w.k1 = carve.take<float>(s.N * s.G);
  w.k2 = carve.take<float>(s.N * s.G);
  w.bytes = carve.used;
  return w;
}

}  // namespace

size_t group_norm_silu_forward_workspace_bytes(const GnForwardArgs& args, int num_sms) {
  if (!shape_ok(args.shape) || empty(args.shape) || num_sms < 1) {
    return 0;
  }
  return forward_workspace(args, num_sms, nullptr).bytes;
}

size_t group_norm_silu_backward_workspace_bytes(const GnBackwardArgs& args, int num_sms) {
  if (!shape_ok(args.shape) || empty(args.shape) || num_sms < 1) {
    return 0;
  }
  return backward_workspace(args, num_sms, nullptr).bytes;
}

cudaError_t launch_group_norm_silu_forward(const GnForwardArgs& a, void* workspace, size_t workspace_bytes,
                                           int num_sms, cudaStream_t stream) {
  const GnShape& s = a.shape;
  if (!shape_ok(s) || num_sms < 1) {
    return cudaErrorInvalidValue;
  }
  if (empty(s)) {
    return cudaSuccess;
  }
  const ForwardWorkspace ws = forward_workspace(a, num_sms, workspace);
  if (workspace_bytes < ws.bytes || (ws.bytes > 0 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const int64_t NG = s.N * s.G;
  const int64_t D = s.C / s.G;
  return with_dtype(s.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const T* x = static_cast<const T*>(a.x);
    T* y = static_cast<T*>(a.y);
    if (s.layout == GnLayout::kNCHW) {
      const NchwStatsPlan sp = plan_nchw_stats(s, a.x, num_sms);
      const RowPlan rp = plan_rows(s, pick_vec(s.dtype, s.HW, {a.x, a.y}), num_sms);
      if (!grid_ok(NG, sp.splits) || !grid_ok(rp.blocks_x, rp.blocks_y)) {
        return cudaErrorInvalidValue;
      }
      cudaError_t err = with_vec<T>(sp.vec, [&](auto vtag) {
        constexpr int V = decltype(vtag)::value;
        gn_stats_nchw<T, V><<<grid(NG, sp.splits), kThreads, 0, stream>>>(x, s.G, sp.group_vecs, sp.chunk_vecs,
                                                                          a.eps, a.mean, a.rstd, ws.partials);
        return cudaGetLastError();
      });
      if (err != cudaSuccess) {
        return err;
      }
      if (sp.splits > 1) {
        gn_stats_combine<<<grid(ceil_div(NG, kWarps)), kThreads, 0, stream>>>(ws.partials, NG, s.G, sp.splits, s.G, 1,
                                                                         a.eps, a.mean, a.rstd);
        if ((err = cudaGetLastError()) != cudaSuccess) {
          return err;
        }
      }
      return with_vec<T>(rp.vec, [&](auto vtag) {
        constexpr int V = decltype(vtag)::value;
        gn_silu_fwd_nchw<T, V><<<grid(rp.blocks_x, rp.blocks_y), kThreads, 0, stream>>>(
            x, y, a.mean, a.rstd, a.weight, a.bias, s.N * s.C, s.C, D, rp.HWV, rp.tpr_log2);
        return cudaGetLastError();
      });
    }
    const NhwcPlan p = plan_nhwc(s, pick_vec(s.dtype, D, {a.x, a.y}), num_sms);
    if (!grid_ok(s.N * p.R, p.tiles) || !grid_ok(ceil_div(NG, kWarps), 1)) {
      return cudaErrorInvalidValue;
    }
    return with_vec<T>(p.vec, [&](auto vtag) {
      constexpr int V = decltype(vtag)::value;
      const dim3 blocks = grid(s.N * p.R, p.tiles);
      gn_stats_nhwc<T, V><<<blocks, kThreads, 0, stream>>>(x, s.HW, p.CV, p.CT, p.RT, p.rt_tree, p.rows_per_chunk,
                                                          p.R, ws.partials);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) {
        return err;
      }
      gn_stats_combine<<<grid(ceil_div(NG, kWarps)), kThreads, 0, stream>>>(ws.partials, NG, s.G, p.R, p.CV, p.DV, a.eps,
                                                                       a.mean, a.rstd);
      if ((err = cudaGetLastError()) != cudaSuccess) {
        return err;
      }
      gn_silu_fwd_nhwc<T, V><<<blocks, kThreads, 0, stream>>>(x, y, a.mean, a.rstd, a.weight, a.bias, s.HW, p.CV,
                                                             p.DV, s.G, p.CT, p.RT, p.rows_per_chunk, p.R);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_group_norm_silu_backward(const GnBackwardArgs& a, void* workspace, size_t workspace_bytes,
                                            int num_sms, cudaStream_t stream) {
  const GnShape& s = a.shape;
  if (!shape_ok(s) || num_sms < 1) {
    return cudaErrorInvalidValue;
  }
  if (empty(s)) {
    return cudaSuccess;
  }
  const BackwardWorkspace ws = backward_workspace(a, num_sms, workspace);
  if (workspace_bytes < ws.bytes || workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t NC = s.N * s.C;
  const int64_t NG = s.N * s.G;
  const int64_t D = s.C / s.G;
  const int vec = backward_vec(a);
  const bool want_affine_grads = a.grad_weight != nullptr || a.grad_bias != nullptr;
  const int64_t coef_threads = NG + (want_affine_grads ? s.C : 0);
  if (!grid_ok(ceil_div(NC, kThreads), 1) || !grid_ok(ceil_div(coef_threads, kThreads), 1)) {
    return cudaErrorInvalidValue;
  }
  // 1 / M in double, then rounded once.
  const float inv_M = static_cast<float>(1.0 / static_cast<double>(D * s.HW));
  return with_dtype(s.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const T* dy = static_cast<const T*>(a.grad_y);
    const T* x = static_cast<const T*>(a.x);
    T* dx = static_cast<T*>(a.grad_x);
    return with_vec<T>(vec, [&](auto vtag) -> cudaError_t {
      constexpr int V = decltype(vtag)::value;
      cudaError_t err;
      // Per-(n, c) sums A, B, straight into ws.A/ws.B when unsplit, else partials then an ordered sum.
      int64_t splits, stride_n, stride_r;
      if (s.layout == GnLayout::kNCHW) {
        const RowPlan rp = plan_rows(s, vec, num_sms);
        if (!grid_ok(rp.blocks_x, rp.blocks_y)) {
          return cudaErrorInvalidValue;
        }
        splits = rp.blocks_y;
        stride_n = s.C;  // partials [Y][N·C]
        stride_r = NC;
        gn_bwd_sums_nchw<T, V><<<grid(rp.blocks_x, rp.blocks_y), kThreads, 0, stream>>>(
            dy, x, a.mean, a.rstd, a.weight, a.bias, NC, s.C, D, rp.HWV, rp.tpr_log2, splits > 1 ? ws.pa : ws.A,
            splits > 1 ? ws.pb : ws.B);
      } else {
        const NhwcPlan p = plan_nhwc(s, vec, num_sms);
        if (!grid_ok(s.N * p.R, p.tiles)) {
          return cudaErrorInvalidValue;
        }
        splits = p.R;
        stride_n = p.R * s.C;  // partials [N][R][C]
        stride_r = s.C;
        gn_bwd_sums_nhwc<T, V><<<grid(s.N * p.R, p.tiles), kThreads, 0, stream>>>(
            dy, x, a.mean, a.rstd, a.weight, a.bias, s.HW, p.CV, p.DV, s.G, p.CT, p.RT, p.rt_tree, p.rows_per_chunk,
            p.R, splits > 1 ? ws.pa : ws.A, splits > 1 ? ws.pb : ws.B);
      }
      if ((err = cudaGetLastError()) != cudaSuccess) {
        return err;
      }
      if (splits > 1) {
        gn_bwd_reduce_partials<<<grid(ceil_div(NC, kThreads)), kThreads, 0, stream>>>(ws.pa, ws.pb, NC, s.C, splits,
                                                                                 stride_n, stride_r, ws.A, ws.B);
        if ((err = cudaGetLastError()) != cudaSuccess) {
          return err;
        }
      }
      gn_bwd_group_coefs<<<grid(ceil_div(coef_threads, kThreads)), kThreads, 0, stream>>>(
          ws.A, ws.B, a.rstd, a.weight, s.N, s.C, s.G, inv_M, ws.k1, ws.k2, a.grad_weight, a.grad_bias);
      if ((err = cudaGetLastError()) != cudaSuccess) {
        return err;
      }
      if (s.layout == GnLayout::kNCHW) {
        const RowPlan rp = plan_rows(s, vec, num_sms);
        gn_bwd_dx_nchw<T, V><<<grid(rp.blocks_x, rp.blocks_y), kThreads, 0, stream>>>(
            dy, x, a.mean, a.rstd, a.weight, a.bias, ws.k1, ws.k2, NC, s.C, D, rp.HWV, rp.tpr_log2, dx);
      } else {
        const NhwcPlan p = plan_nhwc(s, vec, num_sms);
        gn_bwd_dx_nhwc<T, V><<<grid(s.N * p.R, p.tiles), kThreads, 0, stream>>>(
            dy, x, a.mean, a.rstd, a.weight, a.bias, ws.k1, ws.k2, s.HW, p.CV, p.DV, s.G, p.CT, p.RT,
            p.rows_per_chunk, p.R, dx);
      }
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace fastddpm
