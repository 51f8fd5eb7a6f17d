// Launchers of the fused GroupNorm+SiLU CUDA kernels (group_norm_silu.cu), in plain types: raw pointers,
// sizes and a cudaStream_t, no torch. The binding (group_norm_silu_binding.cpp) checks the tensors,
// allocates the outputs and the workspace, and calls these.
//
// x is viewed as [N, C, HW] (HW = the product of the spatial sizes, 1 for a 2-D x), with G groups of
// D = C / G channels; a group (n, g) holds M = D * HW elements. Two memory layouts:
//   kNCHW: x[n][c][hw] at (n * C + c) * HW + hw   (contiguous)
//   kNHWC: x[n][hw][c] at (n * HW + hw) * C + c   (channels_last, channels_last_3d, ...)
// mean, rstd: float32 [N, G]; weight, bias: float32 [C] or nullptr (1 and 0); grad_weight, grad_bias:
// float32 [C] or nullptr (not computed). y, grad_y, x, grad_x: the dtype given, in the layout given.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastddpm {
namespace cuda {

enum class GnDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class GnLayout : int { kNCHW = 0, kNHWC = 1 };

struct GnShape {
  int64_t N;   // batch
  int64_t C;   // channels
  int64_t HW;  // spatial elements per channel
  int64_t G;   // groups; C % G == 0
  GnLayout layout;
  GnDtype dtype;
};

struct GnForwardArgs {
  GnShape shape;
  const void* x;
  const float* weight;  // nullable
  const float* bias;    // nullable
  float eps;
  void* y;
  float* mean;  // [N, G]
  float* rstd;  // [N, G], 1 / sqrt(biased var + eps)
};

struct GnBackwardArgs {
  GnShape shape;
  const void* grad_y;
  const void* x;
  const float* mean;    // [N, G], as the forward saved it
  const float* rstd;    // [N, G]
  const float* weight;  // nullable
  const float* bias;    // nullable
  void* grad_x;
  float* grad_weight;  // [C] or nullptr
  float* grad_bias;    // [C] or nullptr
};

// Bytes of scratch memory the launcher needs (it depends on the shape, on the SM count and on the
// pointers' alignment, which picks the vector width). Zero means none: the workspace may then be null.
size_t group_norm_silu_forward_workspace_bytes(const GnForwardArgs& args, int num_sms);
size_t group_norm_silu_backward_workspace_bytes(const GnBackwardArgs& args, int num_sms);

// Enqueue the kernels on `stream`. Returns cudaSuccess, the first launch error (cudaGetLastError), or
// cudaErrorInvalidValue for sizes the kernels cannot take (a grid too large, a workspace too small).
// num_sms: the device's multiprocessor count, which sets how far a group's reduction is split. The
// results are deterministic for a given shape, layout, alignment and num_sms: every reduction runs in a
// fixed order, with no floating-point atomics.
cudaError_t launch_group_norm_silu_forward(const GnForwardArgs& args, void* workspace, size_t workspace_bytes,
                                           int num_sms, cudaStream_t stream);
cudaError_t launch_group_norm_silu_backward(const GnBackwardArgs& args, void* workspace, size_t workspace_bytes,
                                            int num_sms, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastddpm
