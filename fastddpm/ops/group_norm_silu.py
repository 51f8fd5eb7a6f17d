"""group_norm_silu: y = SiLU(GroupNorm(x; G, weight, bias, eps)), the U-Net's normalisation + activation.

The schemas live in csrc/fastddpm.cpp (C++ kernels: csrc/cpu/group_norm_silu*.cpp, csrc/cuda/); this file
adds their fake (meta) implementations and the autograd of the forward op, and chooses the backend per call.

    group_norm_silu(x, num_groups, weight, bias, eps) -> (y, mean, rstd)
    group_norm_silu_backward(grad_y, x, mean, rstd, weight, bias, num_groups)
        -> (grad_x, grad_weight, grad_bias)

y and grad_x are ``empty_like(x)`` (x's dtype and, for dense x, its memory format); mean and rstd are the
[N, G] group statistics (rstd = 1/sqrt(var + eps), biased variance) in float32, float64 for a float64 x,
and are not differentiable; grad_weight and grad_bias have the dtype of weight and bias, and are empty
(shape [0], x's dtype) when weight or bias is None.
"""

from __future__ import annotations

import torch

from fastddpm import _extension, reference
from fastddpm.ops import choose_backend

OP = "fastddpm::group_norm_silu"
BACKWARD_OP = "fastddpm::group_norm_silu_backward"


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register() -> None:
    if _extension.load() is None:
        return

    @torch.library.register_fake(OP)
    def _(x, num_groups, weight, bias, eps):
        torch._check(x.dim() >= 2, lambda: "group_norm_silu: x must have at least 2 dimensions [N, C, *]")
        torch._check(num_groups > 0 and x.shape[1] % num_groups == 0,
                     lambda: f"group_norm_silu: C = {x.shape[1]} is not divisible by {num_groups} groups")
        stats = x.new_empty((x.shape[0], num_groups), dtype=_stat_dtype(x.dtype))
        return torch.empty_like(x), stats, torch.empty_like(stats)

    @torch.library.register_fake(BACKWARD_OP)
    def _(grad_y, x, mean, rstd, weight, bias, num_groups):
        torch._check(grad_y.shape == x.shape, lambda: "group_norm_silu_backward: grad_y must have x's shape")
        grad_weight = torch.empty_like(weight) if weight is not None else x.new_empty((0,))
        grad_bias = torch.empty_like(bias) if bias is not None else x.new_empty((0,))
        return torch.empty_like(x), grad_weight, grad_bias

    def setup_context(ctx, inputs, output):
        x, num_groups, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.num_groups = num_groups
        ctx.save_for_backward(x, mean, rstd, weight, bias)

    def backward(ctx, grad_y, grad_mean, grad_rstd):
        # z = GroupNorm(x) is recomputed from x, mean and rstd; dz = dy · σ(z) · (1 + z · (1 − σ(z))).
        x, mean, rstd, weight, bias = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.fastddpm.group_norm_silu_backward(
            grad_y, x, mean, rstd, weight, bias, ctx.num_groups)
        return (grad_x if ctx.needs_input_grad[0] else None, None,
                grad_weight if weight is not None and ctx.needs_input_grad[2] else None,
                grad_bias if bias is not None and ctx.needs_input_grad[3] else None, None)

    torch.library.register_autograd(OP, backward, setup_context=setup_context)


_register()


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5,
                    backend: str = "auto") -> torch.Tensor:
    """SiLU(GroupNorm(x)) on the chosen backend: the fused C++ op (CPU; CUDA where built), else the reference.

    No argument checks here: :func:`fastddpm.functional.group_norm_silu` does them.
    """
    if choose_backend("group_norm_silu", x.device, backend) == "cpp":
        return torch.ops.fastddpm.group_norm_silu(x, num_groups, weight, bias, float(eps))[0]
    return reference.group_norm_silu(x, num_groups, weight, bias, eps)
