"""group_norm_silu: y = SiLU(GroupNorm(x; 32 groups, weight, bias)), the U-Net's norm + activation.

Forward reads x and writes y; forward + backward also reads dy (and x again) and writes dx: 2 and 5 tensors
of x's size at the least, which GB/s counts (the fused CPU backward also reads y, from which it gets σ: 6 in
all; eager PyTorch moves an intermediate z too).
"""
import pytest
import torch
import torch.nn.functional as F

from fastddpm import reference
from fastddpm.functional import group_norm_silu

from .conftest import PROVIDERS, run

GROUPS = 32
CASES = [  # (shape, memory format)
    ((16, 128, 32, 32), "contiguous"),
    ((16, 256, 16, 16), "contiguous"),
    ((64, 64, 32, 32), "contiguous"),
    ((16, 128, 32, 32), "channels_last"),
]


def case_id(case):
    shape, layout = case
    return "x".join(map(str, shape)) + ("-cl" if layout == "channels_last" else "")


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_group_norm_silu(benchmark, device, provider, direction, case):
    shape, layout = case
    gen = torch.Generator().manual_seed(0)
    x = (-2.3 + 0.5 * torch.randn(shape, generator=gen)).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (1 + 0.3 * torch.randn(shape[1], generator=gen)).to(device)
    bias = (0.2 * torch.randn(shape[1], generator=gen)).to(device)
    dy = torch.randn(shape, generator=gen).to(device)
    if provider == "eager":
        op = reference.group_norm_silu
    elif provider == "compile":
        torch._dynamo.reset()  # each case compiles afresh (else the recompilation limit falls back to eager)
        op = torch.compile(reference.group_norm_silu)
    else:
        op = group_norm_silu  # the chosen backend: the fused C++ op on CPU (and CUDA where built)

    if direction == "fwd":
        def fn():
            with torch.no_grad():
                return (op(x, GROUPS, weight, bias),)
    else:
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]

        def fn():
            return torch.autograd.grad(op(*leaves[:1], GROUPS, *leaves[1:]), leaves, dy)

    tensors = 2 if direction == "fwd" else 5
    out = run(benchmark, fn, device, bytes_moved=tensors * x.numel() * x.element_size())

    # Against float64 (DESIGN.md: 1e-5 elementwise, 1e-4 for gradients), whatever the provider.
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y64 = F.silu(F.group_norm(leaves64[0], GROUPS, leaves64[1], leaves64[2], 1e-5))
    if direction == "fwd":
        assert out[0].shape == x.shape and rel_err(out[0], y64.detach()) <= 1e-5
    else:
        refs = torch.autograd.grad(y64, leaves64, dy.double())
        if provider == "fastddpm":  # the fused op keeps x's layout (PyTorch's CUDA group_norm returns NCHW)
            assert out[0].stride() == x.stride()
        assert all(rel_err(o, r) <= 1e-4 for o, r in zip(out, refs))
