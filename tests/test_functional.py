"""fastddpm.functional.group_norm_silu against an independent float64 computation; gradients; bad inputs."""

import pytest
import torch

from fastddpm.functional import group_norm_silu


def group_norm_silu_fp64(x, num_groups, weight=None, bias=None, eps=1e-5):
    """SiLU(GroupNorm(x)) in float64, by hand: per (sample, group) mean and biased variance (two-pass)."""
    x = x.double()
    n, c = x.shape[:2]
    g = x.reshape(n, num_groups, -1)
    mean = g.mean(dim=2, keepdim=True)
    var = (g - mean).square().mean(dim=2, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    affine_shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(affine_shape)
    if bias is not None:
        y = y + bias.double().reshape(affine_shape)
    return y * torch.sigmoid(y)


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


CASES = [  # (shape, num_groups)
    ((3, 6, 5, 4), 3),
    ((2, 96, 5, 7), 32),
    ((4, 64, 8, 8), 32),
    ((2, 10, 7), 5),
    ((5, 12), 4),
    ((1, 32, 3, 3), 1),
    ((2, 16, 3, 3), 16),
    ((2, 8, 2, 3, 5), 4),
]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,num_groups", CASES)
def test_matches_fp64_reference(shape, num_groups, affine):
    gen = torch.Generator().manual_seed(hash((shape, num_groups, affine)) % 2**31)
    x = -2.3 + 0.5 * torch.randn(shape, generator=gen)
    c = shape[1]
    weight = 1.0 + 0.3 * torch.randn(c, generator=gen) if affine else None
    bias = 0.2 * torch.randn(c, generator=gen) if affine else None
    out = group_norm_silu(x, num_groups, weight, bias, 1e-5)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, group_norm_silu_fp64(x, num_groups, weight, bias, 1e-5)) <= 1e-5


@pytest.mark.parametrize("shape,num_groups", [((3, 6, 5, 4), 3), ((2, 96, 5, 7), 32)])
def test_channels_last(shape, num_groups):
    gen = torch.Generator().manual_seed(1)
    x = (-2.3 + 0.5 * torch.randn(shape, generator=gen)).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
    out = group_norm_silu(x, num_groups, weight, bias)
    assert rel_err(out, group_norm_silu_fp64(x, num_groups, weight, bias)) <= 1e-5


def test_eps_is_used():
    # A constant group has variance 0: the output is then bias-only unless eps is ignored (inf / nan).
    x = torch.full((2, 4, 3, 3), 1.7)
    x[:, 2:] = -2.3 + 0.5 * torch.randn(2, 2, 3, 3)
    for eps in (1e-5, 1e-1):
        out = group_norm_silu(x, 2, eps=eps)
        assert torch.isfinite(out).all()
        assert rel_err(out, group_norm_silu_fp64(x, 2, eps=eps)) <= 1e-5


def test_gradcheck_fp64():
    gen = torch.Generator().manual_seed(2)
    x = (-2.3 + 0.5 * torch.randn(2, 4, 3, 2, generator=gen, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: group_norm_silu(x, 2, w, b), (x, weight, bias))


X6 = torch.randn(2, 6, 3)


@pytest.mark.parametrize(
    "x,num_groups,weight,bias,exc,match",
    [
        ([[1.0, 2.0]], 1, None, None, TypeError, "must be a torch.Tensor"),
        (torch.ones(2, 4, dtype=torch.int64), 2, None, None, TypeError, "floating-point"),
        (torch.randn(4), 2, None, None, ValueError, "at least 2 dimensions"),
        (X6, 4, None, None, ValueError, r"channels \(6\) must be divisible by num_groups \(4"),
        (X6, 0, None, None, ValueError, "num_groups must be a positive int"),
        (X6, 3, torch.ones(5), None, ValueError, r"weight must be 1-D of size C=6 .* \(5,\)"),
        (X6, 3, None, torch.ones(6, 1), ValueError, r"bias must be 1-D of size C=6 .* \(6, 1\)"),
        (X6, 3, [1.0] * 6, None, TypeError, "weight must be a torch.Tensor"),
    ],
)
@pytest.mark.isolated
def test_bad_inputs_raise(x, num_groups, weight, bias, exc, match):
    with pytest.raises(exc, match=match):
        group_norm_silu(x, num_groups, weight, bias)
