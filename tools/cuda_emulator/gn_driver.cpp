// C entry points around the GroupNorm+SiLU launchers of csrc/cuda/group_norm_silu.cu, compiled for the host
// through emu_cuda.h (see emulate.py). Every array the kernels touch is copied into a heap block of exactly
// its size (x and grad_x `offset` bytes into theirs, to exercise the unaligned paths), outputs and workspace
// poisoned with 0xFF bytes (NaN), so that AddressSanitizer flags any access outside them and an unwritten
// output element comes back NaN.
#include "emu_cuda.h"

#include GN_SOURCE

#include <cstdlib>
#include <cstring>

namespace {

using fastddpm::cuda::GnDtype;
using fastddpm::cuda::GnLayout;
using fastddpm::cuda::GnShape;

// A heap block of exactly offset + bytes, poisoned with 0xFF bytes.
char* exact(size_t bytes, size_t offset) {
  char* block = static_cast<char*>(std::malloc(offset + bytes));
  std::memset(block, 0xFF, offset + bytes);
  return block;
}

float* copy_floats(const float* src, int64_t n) {
  if (src == nullptr) {
    return nullptr;
  }
  float* block = reinterpret_cast<float*>(exact(n * sizeof(float), 0));
  std::memcpy(block, src, n * sizeof(float));
  return block;
}

}  // namespace

extern "C" {

const char* emu_log() { return emu::S.log.c_str(); }
void emu_clear_log() { emu::S.log.clear(); }

int emu_forward(int64_t N, int64_t C, int64_t HW, int64_t G, int layout, int dtype, const void* x, const float* w,
                const float* b, float eps, void* y, float* mean, float* rstd, int num_sms, int offset) {
  const GnShape shape{N, C, HW, G, static_cast<GnLayout>(layout), static_cast<GnDtype>(dtype)};
  const size_t bytes = static_cast<size_t>(N * C * HW) * (dtype == 0 ? 4 : 2);
  char* xb = exact(bytes, offset);
  std::memcpy(xb + offset, x, bytes);
  char* yb = exact(bytes, offset);
  float* wb = copy_floats(w, C);
  float* bb = copy_floats(b, C);
  float* mb = reinterpret_cast<float*>(exact(N * G * sizeof(float), 0));
  float* rb = reinterpret_cast<float*>(exact(N * G * sizeof(float), 0));
  const fastddpm::cuda::GnForwardArgs args{shape, xb + offset, wb, bb, eps, yb + offset, mb, rb};
  const size_t ws_bytes = fastddpm::cuda::group_norm_silu_forward_workspace_bytes(args, num_sms);
  char* ws = ws_bytes > 0 ? exact(ws_bytes, 0) : nullptr;
  const cudaError_t err = fastddpm::cuda::launch_group_norm_silu_forward(args, ws, ws_bytes, num_sms, nullptr);
  std::memcpy(y, yb + offset, bytes);
  std::memcpy(mean, mb, N * G * sizeof(float));
  std::memcpy(rstd, rb, N * G * sizeof(float));
  for (void* p : {static_cast<void*>(xb), static_cast<void*>(yb), static_cast<void*>(wb), static_cast<void*>(bb),
                  static_cast<void*>(mb), static_cast<void*>(rb), static_cast<void*>(ws)}) {
    std::free(p);
  }
  return static_cast<int>(err);
}

int emu_backward(int64_t N, int64_t C, int64_t HW, int64_t G, int layout, int dtype, const void* gy, const void* x,
                 const float* mean, const float* rstd, const float* w, const float* b, void* gx, float* gw,
                 float* gb, int num_sms, int offset) {
  const GnShape shape{N, C, HW, G, static_cast<GnLayout>(layout), static_cast<GnDtype>(dtype)};
  const size_t bytes = static_cast<size_t>(N * C * HW) * (dtype == 0 ? 4 : 2);
  char* gyb = exact(bytes, 0);
  std::memcpy(gyb, gy, bytes);
  char* xb = exact(bytes, offset);
  std::memcpy(xb + offset, x, bytes);
  char* gxb = exact(bytes, offset);
  float* mb = copy_floats(mean, N * G);
  float* rb = copy_floats(rstd, N * G);
  float* wb = copy_floats(w, C);
  float* bb = copy_floats(b, C);
  float* gwb = gw != nullptr ? reinterpret_cast<float*>(exact(C * sizeof(float), 0)) : nullptr;
  float* gbb = gb != nullptr ? reinterpret_cast<float*>(exact(C * sizeof(float), 0)) : nullptr;
  const fastddpm::cuda::GnBackwardArgs args{shape, gyb, xb + offset, mb, rb, wb, bb, gxb + offset, gwb, gbb};
  const size_t ws_bytes = fastddpm::cuda::group_norm_silu_backward_workspace_bytes(args, num_sms);
  char* ws = ws_bytes > 0 ? exact(ws_bytes, 0) : nullptr;
  const cudaError_t err = fastddpm::cuda::launch_group_norm_silu_backward(args, ws, ws_bytes, num_sms, nullptr);
  std::memcpy(gx, gxb + offset, bytes);
  if (gw != nullptr) {
    std::memcpy(gw, gwb, C * sizeof(float));
  }
  if (gb != nullptr) {
    std::memcpy(gb, gbb, C * sizeof(float));
  }
  for (void* p : {static_cast<void*>(gyb), static_cast<void*>(xb), static_cast<void*>(gxb), static_cast<void*>(mb),
                  static_cast<void*>(rb), static_cast<void*>(wb), static_cast<void*>(bb), static_cast<void*>(gwb),
                  static_cast<void*>(gbb), static_cast<void*>(ws)}) {
    std::free(p);
  }
  return static_cast<int>(err);
}

}  // extern "C"
