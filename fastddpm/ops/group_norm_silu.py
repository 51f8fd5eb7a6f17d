"""group_norm_silu: y = SiLU(GroupNorm(x; G, weight, bias, eps)), the U-Net's normalisation + activation.

The schemas live in csrc/fastddpm.cpp (C++ kernels: csrc/cpu/group_norm_silu*.cpp, csrc/cuda/); their
autograd is C++ too (csrc/autograd.cpp: the Python register_autograd of earlier versions cost
~100 µs a forward + backward, more than the kernels at the U-Net's 4×4 and 8×8 maps). This file adds the fake
(meta) implementations and chooses the backend per call.

    group_norm_silu(x, num_groups, weight, bias, eps) -> (y, mean, rstd)
    group_norm_silu_backward(grad_y, x, mean, rstd, weight, bias, num_groups)
        -> (grad_x, grad_weight, grad_bias)
    group_norm_silu_output_backward(grad_y, x, y, mean, rstd, weight, bias, num_groups)       CPU
        -> (grad_x, grad_weight, grad_bias)
    group_norm_silu_train(x, num_groups, weight, bias, eps) -> (y, mean, rstd, silu_grad)      CPU
    group_norm_silu_train_backward(grad_y, x, silu_grad, mean, rstd, weight, bias, num_groups)   CPU
        -> (grad_x, grad_weight, grad_bias)

The CPU backward does not evaluate σ again (σ is most of its work). For a float32 or float64 x the autograd
node of group_norm_silu keeps its output y and runs group_norm_silu_output_backward, which gets σ back as
y / z (z recomputed from x and the statistics): one division per element, and no tensor saved beyond y, which
the caller holds anyway. (As for torch.sigmoid or relu, a backward after an in-place change of y then raises
autograd's "modified by an inplace operation" error.) A bfloat16 or float16 y holds too few bits of σ, so a
CPU call in those dtypes that needs gradients runs the training pair: its forward also saves
silu_grad = dSiLU/dz in float32, from the same σ(z) as y, which the backward reads. GPUs recompute σ (their
kernels are bandwidth-bound: extra bytes would cost more than the arithmetic they save).

y and grad_x are ``empty_like(x)`` (x's dtype and, for dense x, its memory format); mean and rstd are the
[N, G] group statistics (rstd = 1/sqrt(var + eps), biased variance) in float32, float64 for a float64 x,
and are not differentiable; grad_weight and grad_bias have the dtype of weight and bias, and are empty
(shape [0], x's dtype) when weight or bias is None.
"""

from __future__ import annotations

import torch

from fastddpm import _extension, reference
from fastddpm.ops import choose_backend, register_fake

OP = "fastddpm::group_norm_silu"
BACKWARD_OP = "fastddpm::group_norm_silu_backward"
# The CPU backward for float32/float64 x (the autograd node saves y): SiLU' from y, σ = y / z.
OUTPUT_BACKWARD_OP = "fastddpm::group_norm_silu_output_backward"
# The CPU training pair of bfloat16/float16 x: the forward also saves dSiLU/dz (float32), which the backward
# reads instead of recomputing σ.
TRAIN_OP = "fastddpm::group_norm_silu_train"
TRAIN_BACKWARD_OP = "fastddpm::group_norm_silu_train_backward"


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(name, x, num_groups, save_grad):
    torch._check(x.dim() >= 2, lambda: f"{name}: x must have at least 2 dimensions [N, C, *]")
    torch._check(num_groups > 0 and x.shape[1] % num_groups == 0,
                 lambda: f"{name}: C = {x.shape[1]} is not divisible by {num_groups} groups")
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stat_dtype(x.dtype))
    out = (torch.empty_like(x), stats, torch.empty_like(stats))
    return out + (torch.empty_like(x, dtype=_stat_dtype(x.dtype)),) if save_grad else out


def _fake_backward(name, grad_y, x, weight, bias):
    torch._check(grad_y.shape == x.shape, lambda: f"{name}: grad_y must have x's shape")
    grad_weight = torch.empty_like(weight) if weight is not None else x.new_empty((0,))
    grad_bias = torch.empty_like(bias) if bias is not None else x.new_empty((0,))
    return torch.empty_like(x), grad_weight, grad_bias


def _register() -> None:
    if _extension.load() is None:
        return

    register_fake(OP, lambda x, num_groups, weight, bias, eps:
                  _fake_forward("group_norm_silu", x, num_groups, False))
    register_fake(BACKWARD_OP, lambda grad_y, x, mean, rstd, weight, bias, num_groups:
                  _fake_backward("group_norm_silu_backward", grad_y, x, weight, bias))
    register_fake(OUTPUT_BACKWARD_OP, lambda grad_y, x, y, mean, rstd, weight, bias, num_groups:
                  _fake_backward("group_norm_silu_output_backward", grad_y, x, weight, bias))
    register_fake(TRAIN_OP, lambda x, num_groups, weight, bias, eps:
                  _fake_forward("group_norm_silu_train", x, num_groups, True))
    register_fake(TRAIN_BACKWARD_OP, lambda grad_y, x, silu_grad, mean, rstd, weight, bias, num_groups:
                  _fake_backward("group_norm_silu_train_backward", grad_y, x, weight, bias))


_register()


# The dtypes whose CPU calls that need gradients run the training pair (float32/float64 run group_norm_silu,
# whose autograd node recovers SiLU' from y).
_TRAIN_PAIR_DTYPES = (torch.bfloat16, torch.float16)


def _needs_grad(x, weight, bias) -> bool:
    # (plain tests, not any() over a generator: this runs on every call, 23 times a small U-Net forward)
    return torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5,
                    backend: str = "auto", check=None) -> torch.Tensor:
    """SiLU(GroupNorm(x)) on the chosen backend: the fused C++ op (CPU; CUDA where built), else the reference.

    ``check(x, num_groups, weight, bias)`` (:func:`fastddpm.functional.group_norm_silu` passes its checks)
    runs before the reference, and after a C++ call that raised, to raise its own error instead; a C++ call
    that succeeds needs none (the op checks its arguments itself). While torch.compile traces, it runs first.
    """
    if check is not None and (not isinstance(x, torch.Tensor) or torch.compiler.is_dynamo_compiling()):
        # (a compiled graph calls the op outside this function: the checks go into the trace, as before)
        check(x, num_groups, weight, bias)
        check = None
    device = x.device
    # The CUDA kernels take float32/float16/bfloat16: a float64 x on CUDA runs the reference, unless the
    # backend argument asks for "cpp" by name (which then says that it does not take float64); the
    # FASTDDPM_BACKEND variable, a default for every op, does not.
    if choose_backend("group_norm_silu", device, backend) == "cpp" and not (
            x.dtype == torch.float64 and device.type == "cuda" and backend == "auto"):
        try:
            # (the ops' autograd is C++: a call that needs no gradient passes straight through it)
            if device.type == "cpu" and x.dtype in _TRAIN_PAIR_DTYPES and _needs_grad(x, weight, bias):
                return torch.ops.fastddpm.group_norm_silu_train.default(x, num_groups, weight, bias, float(eps))[0]
            return torch.ops.fastddpm.group_norm_silu.default(x, num_groups, weight, bias, float(eps))[0]
        except Exception as e:
            if check is None:
                raise
            error = e
        check(x, num_groups, weight, bias)  # raises where the arguments are at fault (outside the except: unchained)
        raise error
    if check is not None:
        check(x, num_groups, weight, bias)
    return reference.group_norm_silu(x, num_groups, weight, bias, eps)
