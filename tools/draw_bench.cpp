// Nanoseconds per normal of the fused CPU kernels' draw (csrc/cpu/philox_normal.h) on one core, with and
// without GCC's instruction scheduling before register allocation (what csrc/cpu/fused_kernels.cpp turns on
// for its AVX2 build), and the check that both draw the same bits.
//
//     bash tools/draw_bench.sh            (g++ on x86-64 with AVX2 and FMA; no torch needed)
//
// Times are thread CPU time, best of 15 draws of 2^20 normals, the two builds alternated 8 times.
#include <immintrin.h>
#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace plain {
#define FASTDDPM_AVX2 1
#include "../csrc/cpu/philox_normal.h"
#undef FASTDDPM_AVX2
}  // namespace plain
#pragma GCC optimize("schedule-insns", "sched-pressure")
namespace scheduled {
#define FASTDDPM_AVX2 1
#include "../csrc/cpu/philox_normal.h"
#undef FASTDDPM_AVX2
}  // namespace scheduled
#pragma GCC pop_options

namespace {

double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

template <typename Draw>
double ns_per_normal(Draw draw, std::vector<float>& out) {
  const int64_t n = static_cast<int64_t>(out.size()) - 64;
  double best = 1e30;
  for (int rep = 0; rep < 15; ++rep) {
    const double start = thread_seconds();
    draw(0x243F6A8885A308D3ull, 12345u, n, out.data());
    best = std::min(best, thread_seconds() - start);
  }
  return best / static_cast<double>(n) * 1e9;
}

}  // namespace

int main() {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("this CPU has no AVX2/FMA: nothing to time\n");
    return 0;
  }
  const int64_t n = int64_t{1} << 20;
  std::vector<float> a(n + 64), b(n + 64);
  double best_plain = 1e30, best_scheduled = 1e30;
  for (int round = 0; round < 8; ++round) {
    best_plain = std::min(best_plain, ns_per_normal(plain::normals, a));
    best_scheduled = std::min(best_scheduled, ns_per_normal(scheduled::normals, b));
  }
  int64_t differ = 0;
  for (int64_t i = 0; i < n; ++i) {
    differ += a[i] != b[i];
  }
  std::printf("%lld normals: plain %.3f ns, scheduled %.3f ns a normal (%.2fx); %lld of them differ\n",
              static_cast<long long>(n), best_plain, best_scheduled, best_plain / best_scheduled,
              static_cast<long long>(differ));
  return differ == 0 ? 0 : 1;
}
