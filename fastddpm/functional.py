"""Functional API of fastddpm's ops: validate the arguments, then run the op."""

from __future__ import annotations

import torch

from fastddpm.ops import group_norm_silu as _group_norm_silu_op


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5):
    """y = SiLU(GroupNorm(x)), the normalisation + activation pair in every block of the DDPM U-Net.

    Arguments follow ``F.group_norm``: ``x`` is [N, C, *], ``C`` divisible by ``num_groups``, and the
    optional affine ``weight``/``bias`` are 1-D of size ``C``. Differentiable in x, weight and bias; the
    output has x's dtype and memory format (contiguous or channels_last).
    """
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"group_norm_silu: num_groups must be a positive int, got {num_groups!r}")
    # The C++ op checks the rest itself; these Python checks would run on every call of a network (23 in the
    # small U-Net's forward). So they run first for the reference, while torch.compile traces, and after a
    # failed C++ call, for their message.
    return _group_norm_silu_op.group_norm_silu(x, num_groups, weight, bias, eps, check=_check_group_norm_silu)


def _check_group_norm_silu(x, num_groups, weight, bias) -> None:
    """group_norm_silu's arguments (num_groups checked already): raises the error that names the problem."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm_silu: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"group_norm_silu: x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(
            f"group_norm_silu: x must have at least 2 dimensions [N, C, *], got shape {tuple(x.shape)}"
        )
    channels = x.shape[1]
    if channels % num_groups != 0:
        raise ValueError(
            f"group_norm_silu: number of channels ({channels}) must be divisible by num_groups ({num_groups})"
        )
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if not isinstance(param, torch.Tensor):
            raise TypeError(
                f"group_norm_silu: {name} must be a torch.Tensor or None, got {type(param).__name__}"
            )
        if param.shape != (channels,):
            raise ValueError(
                f"group_norm_silu: {name} must be 1-D of size C={channels} (x.shape[1]), "
                f"got shape {tuple(param.shape)}"
            )
