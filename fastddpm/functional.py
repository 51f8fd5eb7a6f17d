"""Functional API of fastddpm's ops."""

from __future__ import annotations

from fastddpm.ops.group_norm_silu import group_norm_silu as _group_norm_silu_entry


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5):
    """y = SiLU(GroupNorm(x)), the normalisation + activation pair in every block of the DDPM U-Net.

    Arguments follow ``F.group_norm``: ``x`` is [N, C, *], ``C`` divisible by ``num_groups``, and the
    optional affine ``weight``/``bias`` are 1-D of size ``C``. Differentiable in x, weight and bias; the
    output has x's dtype and memory format (contiguous or channels_last). Runs the fused op on the tensors'
    device where built, else the PyTorch reference (fastddpm/ops/group_norm_silu.py checks the arguments).
    """
    return _group_norm_silu_entry(x, num_groups, weight, bias, eps)
