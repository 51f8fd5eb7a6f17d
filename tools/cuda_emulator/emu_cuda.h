// A tiny CUDA execution emulator for checking kernels on a machine without a GPU (tools/cuda_emulator/).
//
// The .cu file is compiled by the host compiler after emulate.py rewrites each `k<<<grid, block, smem,
// stream>>>(args)` into `::emu::Launch(k, grid, block, smem, stream)(args)`. Blocks run one after another;
// the threads of a block are fibers (ucontext) of one OS thread, run round-robin; __syncthreads is a barrier
// that yields until every thread of the block has arrived, so one that some thread never reaches (an early
// return before __syncthreads) aborts as a deadlock; a warp shuffle waits for the lane it reads from. __shared__
// variables become function statics (one block at a time). Device intrinsics are the exact host functions
// (__expf is expf). Built with -fsanitize=address, every global access is checked against the exact-size
// host allocations the driver makes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

namespace emu {

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  uint3 tid;
  void* fake_stack = nullptr;  // AddressSanitizer's fake stack of this fiber while it is switched out
};

struct State {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  int current = -1;
  int nthreads = 0;
  std::function<void()> body;
  dim3 grid, block;
  uint3 bid;
  int bar_count = 0;
  long bar_gen = 0;
  std::vector<long> lane_seq;            // shuffles made so far, per thread
  std::vector<std::vector<float>> shfl;  // per warp: shuffle k's value of lane l at k * 32 + l
  cudaError_t error = cudaSuccess;
  std::string log;
  // AddressSanitizer fiber bookkeeping: the scheduler's stack, as the first switch into a fiber reports it.
  const void* main_bottom = nullptr;
  size_t main_size = 0;
};

inline State S;
constexpr size_t kStack = 256 * 1024;
constexpr long kMaxRounds = 10000000;

inline const uint3& thread_idx() { return S.fibers[S.current].tid; }
inline int flat_tid() {
  const uint3& t = thread_idx();
  return static_cast<int>(t.x + S.block.x * (t.y + S.block.y * t.z));
}

inline void switch_to_scheduler() {
  Fiber& f = S.fibers[S.current];
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&f.fake_stack, S.main_bottom, S.main_size);
#endif
  swapcontext(&f.ctx, &S.scheduler);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f.fake_stack, &S.main_bottom, &S.main_size);
#endif
}

inline void yield() { switch_to_scheduler(); }

inline void trampoline() {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &S.main_bottom, &S.main_size);
#endif
  S.body();
  S.fibers[S.current].done = true;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(nullptr, S.main_bottom, S.main_size);  // the fiber ends: drop its fake stack
#endif
  // returning follows uc_link to the scheduler
}

inline void run_block() {
  const int n = S.nthreads;
  S.fibers.resize(n);
  for (int i = 0; i < n; ++i) {
    Fiber& f = S.fibers[i];
    f.stack.resize(kStack);
    f.done = false;
    f.tid = uint3{static_cast<unsigned>(i % S.block.x), static_cast<unsigned>((i / S.block.x) % S.block.y),
                  static_cast<unsigned>(i / (S.block.x * S.block.y))};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &S.scheduler;
    makecontext(&f.ctx, trampoline, 0);
  }
  S.bar_count = 0;
  S.lane_seq.assign(n, 0);
  S.shfl.assign((n + 31) / 32, {});
  for (long round = 0;; ++round) {
    bool any = false;
    for (int i = n - 1; i >= 0; --i) {
      if (S.fibers[i].done) {
        continue;
      }
      any = true;
      S.current = i;
#if defined(__SANITIZE_ADDRESS__)
      void* save = nullptr;
      __sanitizer_start_switch_fiber(&save, S.fibers[i].stack.data(), S.fibers[i].stack.size());
#endif
      swapcontext(&S.scheduler, &S.fibers[i].ctx);
#if defined(__SANITIZE_ADDRESS__)
      __sanitizer_finish_switch_fiber(save, nullptr, nullptr);
#endif
    }
    if (!any) {
      break;
    }
    if (round > kMaxRounds) {
      std::fprintf(stderr, "emu: deadlock in block (%u, %u): a barrier some threads never reach\n", S.bid.x,
                   S.bid.y);
      std::abort();
    }
  }
  S.current = -1;
}

// Barrier of `count` threads sharing (count_ref, gen_ref).
inline void barrier(int& count_ref, long& gen_ref, int count) {
  const long gen = gen_ref;
  if (++count_ref == count) {
    count_ref = 0;
    ++gen_ref;
    return;
  }
  while (gen_ref == gen) {
    yield();
  }
}

inline void syncthreads() { barrier(S.bar_count, S.bar_gen, S.nthreads); }

// __shfl_down_sync of a converged warp: every lane makes the same sequence of shuffles; lane l's k-th shuffle
// stores its value as (k, l) and reads (k, l + offset), waiting only until that lane has made its k-th
// shuffle. Blocks run their threads from the last to the first, so a lane's source lane (a higher one) is
// usually there already and no one waits.
inline float shfl_down(float v, int offset) {
  const int t = flat_tid();
  const int w = t / 32, lane = t % 32;
  const int width = std::min(32, S.nthreads - w * 32);
  const long seq = S.lane_seq[t]++;
  std::vector<float>& buf = S.shfl[w];
  if (static_cast<long>(buf.size()) < (seq + 1) * 32) {
    buf.resize((seq + 1) * 32, NAN);
  }
  buf[seq * 32 + lane] = v;
  const int src = lane + offset;
  if (src >= width) {
    return v;
  }
  while (S.lane_seq[w * 32 + src] <= seq) {
    yield();
  }
  return S.shfl[w][seq * 32 + src];
}

inline cudaError_t last_error() {
  const cudaError_t e = S.error;
  S.error = cudaSuccess;
  return e;
}

template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) {
    return "f32";
  } else if constexpr (std::is_same_v<T, __half>) {
    return "f16";
  } else {
    return "bf16";
  }
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  const char* name;
  Launch(const char* name_, void (*k)(P...), dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr)
      : kernel(k), grid(g), block(b), name(name_) {}
  template <typename... A>
  void operator()(A&&... a) {
    const unsigned long threads = 1ul * block.x * block.y * block.z;
    char line[256];
    std::snprintf(line, sizeof line, "%s grid=(%u,%u,%u) block=%lu\n", name, grid.x, grid.y, grid.z, threads);
    S.log += line;
    if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
        grid.z > 65535) {
      S.error = cudaErrorInvalidConfiguration;
      return;
    }
    std::tuple<P...> args{static_cast<P>(a)...};
    S.body = [&] { std::apply(kernel, args); };
    S.grid = grid;
    S.block = block;
    S.nthreads = static_cast<int>(threads);
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          S.bid = uint3{x, y, z};
          run_block();
        }
      }
    }
  }
};

}  // namespace emu

// ---- CUDA names, redirected (after the real headers, so only the kernels' own code sees these)
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::S.bid)
#define gridDim (::emu::S.grid)
#define blockDim (::emu::S.block)
#define cudaGetLastError() ::emu::last_error()
#define __expf(x) ::expf(x)
#define __fdividef(a, b) ((a) / (b))

inline void __syncthreads() { ::emu::syncthreads(); }
inline float __shfl_down_sync(unsigned, float v, int offset) { return ::emu::shfl_down(v, offset); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline void __stwb(T* p, T v) {
  *p = v;
}
