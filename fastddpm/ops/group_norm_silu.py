"""group_norm_silu: y = SiLU(GroupNorm(x; G, weight, bias, eps)), the U-Net's normalisation + activation.

One op and its backward op, both C++ (schemas in csrc/fastddpm.cpp; kernels in csrc/cpu/group_norm_silu*.cpp
and csrc/cuda/group_norm_silu*; the autograd in csrc/autograd.cpp, which a Python register_autograd would
outcost at the U-Net's 4×4 and 8×8 maps). This file adds their fake (meta) implementations, checks the
arguments and chooses the backend per call.

    group_norm_silu(x, num_groups, weight, bias, eps, save_silu_grad=False) -> (y, mean, rstd, silu_grad)
    group_norm_silu_backward(grad_y, x, mean, rstd, weight, bias, num_groups, y=None, silu_grad=None)
        -> (grad_x, grad_weight, grad_bias)

The CPU backward does not evaluate σ again (σ is most of its work). For a float32 or float64 x the autograd
node keeps the output y and passes it to the backward, which gets σ back as y / z (z recomputed from x and the
statistics): one division per element, and no tensor saved beyond y, which the caller holds anyway. (As for
torch.sigmoid or relu, a backward after an in-place change of y then raises autograd's "modified by an inplace
operation" error.) A bfloat16 or float16 y holds too few bits of σ, so a CPU call in those dtypes that needs
gradients asks the forward for save_silu_grad: it also returns silu_grad = dSiLU/dz in float32, from the same
σ(z) as y, which the node saves and the backward reads. GPUs recompute σ (their kernels are bandwidth-bound:
extra bytes would cost more than the arithmetic they save).

y and grad_x are ``empty_like(x)`` (x's dtype and, for dense x, its memory format); mean and rstd are the
[N, G] group statistics (rstd = 1/sqrt(var + eps), biased variance) in float32, float64 for a float64 x,
and are not differentiable, as is silu_grad (x's shape and the statistics' dtype; [0] unless asked for);
grad_weight and grad_bias have the dtype of weight and bias, and are empty (shape [0], x's dtype) when weight
or bias is None.
"""

from __future__ import annotations

import torch

from fastddpm import _extension, reference
from fastddpm.ops import choose_backend, register_fake

NAME = "group_norm_silu"


def _check_num_groups(num_groups) -> None:
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"{NAME}: num_groups must be a positive int, got {num_groups!r}")


def check_arguments(x, num_groups, weight, bias) -> None:
    """group_norm_silu's arguments, as F.group_norm takes them: raises the error that names the problem."""
    _check_num_groups(num_groups)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{NAME}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{NAME}: x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{NAME}: x must have at least 2 dimensions [N, C, *], got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if channels % num_groups != 0:
        raise ValueError(
            f"{NAME}: number of channels ({channels}) must be divisible by num_groups ({num_groups})")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"{NAME}: {name} must be a torch.Tensor or None, got {type(param).__name__}")
        if param.shape != (channels,):
            raise ValueError(f"{NAME}: {name} must be 1-D of size C={channels} (x.shape[1]), "
                             f"got shape {tuple(param.shape)}")


# ----------------------------------------------------------------------------- fakes
def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(x, num_groups, weight, bias, eps, save_silu_grad=False):
    torch._check(x.dim() >= 2, lambda: f"{NAME}: x must have at least 2 dimensions [N, C, *]")
    torch._check(num_groups > 0 and x.shape[1] % num_groups == 0,
                 lambda: f"{NAME}: C = {x.shape[1]} is not divisible by {num_groups} groups")
    stat_dtype = _stat_dtype(x.dtype)
    mean = x.new_empty((x.shape[0], num_groups), dtype=stat_dtype)
    silu_grad = (torch.empty_like(x, dtype=stat_dtype) if save_silu_grad
                 else x.new_empty((0,), dtype=stat_dtype))
    return torch.empty_like(x), mean, torch.empty_like(mean), silu_grad


def _fake_backward(grad_y, x, mean, rstd, weight, bias, num_groups, y=None, silu_grad=None):
    name = f"{NAME}_backward"
    torch._check(grad_y.shape == x.shape, lambda: f"{name}: grad_y must have x's shape")
    torch._check(y is None or silu_grad is None,
                 lambda: f"{name}: pass y or silu_grad (what the forward saved), not both")
    grad_weight = torch.empty_like(weight) if weight is not None else x.new_empty((0,))
    grad_bias = torch.empty_like(bias) if bias is not None else x.new_empty((0,))
    return torch.empty_like(x), grad_weight, grad_bias


def _register():
    """The forward op's overload (what the entry calls: looked up once), with both ops' fakes registered;
    None without the C++ extension."""
    if _extension.load() is None:
        return None
    register_fake(f"fastddpm::{NAME}", _fake_forward)
    register_fake(f"fastddpm::{NAME}_backward", _fake_backward)
    return torch.ops.fastddpm.group_norm_silu.default


_forward_op = _register()


# ----------------------------------------------------------------------------- the entry
# The dtypes whose CPU calls that need gradients ask the forward for save_silu_grad (float32/float64 nodes
# keep y and recover SiLU' from it).
_SILU_GRAD_DTYPES = (torch.bfloat16, torch.float16)


def _needs_grad(x, weight, bias) -> bool:
    # (plain tests, not any() over a generator: this runs on every call, 23 times a small U-Net forward)
    return torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5,
                    backend: str = "auto") -> torch.Tensor:
    """SiLU(GroupNorm(x)) on the chosen backend: the fused C++ op (CPU; CUDA where built), else the reference.

    The arguments are checked here (:func:`check_arguments`) before the reference runs, and while
    torch.compile traces; a C++ call checks them itself, and only when it raises do the checks run, to raise
    their own error in its place (they would cost more than the op's kernels at the U-Net's small maps, 23
    calls a forward).
    """
    # (inline, as it runs on every call: the raise is _check_num_groups's)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        _check_num_groups(num_groups)
    if not isinstance(x, torch.Tensor) or torch.compiler.is_dynamo_compiling():
        # (a compiled graph calls the op outside this function: the checks go into the trace)
        check_arguments(x, num_groups, weight, bias)
    device = x.device
    device_type = device.type
    # The CUDA kernels take float32/float16/bfloat16: a float64 x on CUDA runs the reference, unless the
    # backend argument asks for "cpp" by name (which then says that it does not take float64); the
    # FASTDDPM_BACKEND variable, a default for every op, does not.
    if choose_backend(NAME, device, backend) == "cpp" and not (
            device_type == "cuda" and x.dtype == torch.float64 and backend == "auto"):
        try:
            # (the op's autograd is C++: a call that needs no gradient passes straight through it)
            if device_type == "cpu" and x.dtype in _SILU_GRAD_DTYPES and _needs_grad(x, weight, bias):
                return _forward_op(x, num_groups, weight, bias, float(eps), True)[0]  # save_silu_grad
            return _forward_op(x, num_groups, weight, bias, float(eps))[0]
        except Exception as e:
            error = e
        check_arguments(x, num_groups, weight, bias)  # raises where the arguments are at fault (unchained)
        raise error
    check_arguments(x, num_groups, weight, bias)
    return reference.group_norm_silu(x, num_groups, weight, bias, eps)
