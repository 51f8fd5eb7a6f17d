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
  m.def(
      "q_sample(Tensor x_start, Tensor t, Tensor sqrt_alphas_cumprod, "
      "Tensor sqrt_one_minus_alphas_cumprod, Tensor noise) -> Tensor");

  // ---- group_norm_silu (csrc/cpu/group_norm_silu.cpp, csrc/cuda/group_norm_silu*.{cu,cpp})
  // y = SiLU(GroupNorm(x; G, weight, bias, eps)) for x of shape [N, C, *]; also returns the fp32 group
  // statistics mean and rstd = 1/sqrt(var + eps), each [N, G], which the backward reuses.
  m.def("group_norm_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // (grad_x, grad_weight, grad_bias) of the above; z = GroupNorm(x) is recomputed from x, mean and rstd.
  // grad_weight and grad_bias have the dtype of weight/bias, and are empty tensors when weight/bias is None.
  m.def(
      "group_norm_silu_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
      "Tensor? bias, int num_groups) -> (Tensor, Tensor, Tensor)");
  // ---- end group_norm_silu
}
