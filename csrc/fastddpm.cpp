// fastddpm._C: the schema of every fastddpm op, in one place, and the Python module that loads them.
//
// `import fastddpm._C` loads this shared library; its static initialisers register the schemas below
// (TORCH_LIBRARY) and the kernels of csrc/cpu/*.cpp and csrc/cuda/*_binding.cpp (TORCH_LIBRARY_IMPL)
// with the dispatcher, which then serves them as torch.ops.fastddpm.<op>. Import torch first: this
// library links against libtorch without carrying its path. The Python side (fake impls, autograd,
// backend choice) lives in fastddpm/ops/<op>.py.
#include <Python.h>

#include <torch/library.h>

// Set by setup.py: whether csrc/cuda/ was compiled in, and for which GPU architectures.
#ifndef FASTDDPM_WITH_CUDA
#define FASTDDPM_WITH_CUDA 0
#endif
#ifndef FASTDDPM_CUDA_ARCHS
#define FASTDDPM_CUDA_ARCHS ""
#endif

// A module with no functions, only two build facts; importing it is what registers the ops.
// Built against the limited API (py_limited_api in setup.py), as in PyTorch's extension-cpp template.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "fastddpm._C",                                           // name
      "fastddpm C++ ops, served as torch.ops.fastddpm.<op>.",  // doc
      -1,                                                      // no per-interpreter state
      nullptr,                                                 // no methods
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddIntConstant(module, "with_cuda", FASTDDPM_WITH_CUDA) < 0 ||
      PyModule_AddStringConstant(module, "cuda_archs", FASTDDPM_CUDA_ARCHS) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

TORCH_LIBRARY(fastddpm, m) {
  // Forward process, DDPM eq. 4 reparameterised, per sample b:
  //   x_t[b] = sqrt_alphas_cumprod[t[b]] * x_start[b] + sqrt_one_minus_alphas_cumprod[t[b]] * noise[b]
  // with ε given (noise) or drawn in-kernel (seed: exactly one of the two): element i (memory order) of
  // sample b takes lane i % 4 of Philox 4x32-10 at key seed[0], counter offset + b*ceil(N/4) + i/4
  // (fastddpm/contracts.py).
  // Returns (x_t, the drawn ε when write_noise, else an empty tensor).
  m.def(
      "q_sample(Tensor x_start, Tensor t, Tensor sqrt_alphas_cumprod, Tensor sqrt_one_minus_alphas_cumprod, "
      "Tensor? noise, Tensor? seed, int offset, bool write_noise) -> (Tensor, Tensor)");

  // Training loss (eq. 14), target formed in-kernel: objective 0 = ε, 1 = x_0, 2 = v = sqrt_ac*ε - sqrt_1m_ac*x_0;
  // ε given (noise) or regenerated from (seed, offset) as q_sample drew it; optional min-SNR-γ weight;
  // reduction 0 = per-sample [B], 1 = mean (codes: fastddpm/contracts.py). Returns (loss, grad): the loss is
  // float32 (float64 for float64 model_output); grad is empty, or with keep_grad (the training forward: one
  // pass instead of a forward and a backward that each read the prediction and draw or read ε)
  // d(loss)/d(model_output) for an incoming gradient of one (the scalar 1 for mean, ones [B] for none).
  m.def(
      "diffusion_loss(Tensor model_output, Tensor? x_start, Tensor t, Tensor sqrt_alphas_cumprod, "
      "Tensor sqrt_one_minus_alphas_cumprod, Tensor? noise, Tensor? seed, int offset, int objective, "
      "float? min_snr_gamma, int reduction, bool keep_grad) -> (Tensor, Tensor)");
  // d(loss)/d(model_output) for the incoming gradient `grad` of the loss (a scalar or [B]).
  m.def(
      "diffusion_loss_backward(Tensor grad, Tensor model_output, Tensor? x_start, Tensor t, "
      "Tensor sqrt_alphas_cumprod, Tensor sqrt_one_minus_alphas_cumprod, Tensor? noise, Tensor? seed, "
      "int offset, int objective, float? min_snr_gamma, int reduction) -> Tensor");

  // Ancestral step (Algorithm 2) reading the stacked [7, T] table of NoiseSchedule.reverse_table (rows:
  // contracts.h ROW_*; CPU kernel csrc/cpu/reverse_step.cpp, CUDA kernel kernels/reverse_step.py); x0 clipped to
  // +-clip or divided by a per-sample threshold_scale [B]; noise given or drawn; no noise where t == 0.
  // Returns (x_prev, x0 or empty, noise or empty).
  m.def(
      "p_sample_step(Tensor model_output, Tensor x_t, Tensor t, Tensor table, Tensor? noise, Tensor? seed, "
      "int offset, int objective, float? clip, Tensor? threshold_scale, bool write_x0, bool write_noise) "
      "-> (Tensor, Tensor, Tensor)");
  // DDIM step (Song et al. eq. 12) from t to t_prev (t_prev < 0: alpha_bar = final_alpha_cumprod).
  m.def(
      "ddim_step(Tensor model_output, Tensor x_t, Tensor t, Tensor t_prev, Tensor table, Tensor alphas_cumprod, "
      "Tensor? noise, Tensor? seed, int offset, int objective, float eta, float final_alpha_cumprod, "
      "float? clip, Tensor? threshold_scale, bool rederive_noise, bool write_x0, bool write_noise) "
      "-> (Tensor, Tensor, Tensor)");

  // ---- group_norm_silu (csrc/cpu/group_norm_silu*.cpp, csrc/cuda/group_norm_silu*.{cu,cpp})
  // y = SiLU(GroupNorm(x; G, weight, bias, eps)) for x of shape [N, C, *]; also returns the group statistics
  // mean and rstd = 1/sqrt(var + eps), each [N, G] (float32, float64 for a float64 x), which the backward
  // reuses. save_silu_grad (CPU; what bfloat16 and float16 x train with, whose y is too coarse to give SiLU'
  // back): the fourth output is silu_grad = dSiLU/dz at every element (x's shape, the statistics' dtype),
  // computed beside y from the same σ(z); otherwise it is empty ([0]). GPUs recompute σ in the backward
  // (bandwidth-bound: the extra bytes would cost more than the arithmetic).
  m.def(
      "group_norm_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, "
      "bool save_silu_grad=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // (grad_x, grad_weight, grad_bias) of the above; z = GroupNorm(x) is recomputed from x, mean and rstd, and
  // SiLU'(z) from what the forward saved: silu_grad itself; or (CPU, float32 and float64 x) the output y, as
  // σ = y / z (one division per element instead of σ's exp and division); or, neither given, σ(z) anew. At
  // most one of y and silu_grad. grad_weight and grad_bias have the dtype of weight/bias, and are empty
  // tensors when weight/bias is None.
  m.def(
      "group_norm_silu_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
      "Tensor? bias, int num_groups, Tensor? y=None, Tensor? silu_grad=None) -> (Tensor, Tensor, Tensor)");
  // ---- end group_norm_silu
}
