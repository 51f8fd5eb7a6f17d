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

from .conftest import DEVICES, PROVIDERS, run

GROUPS = 32
# (device, shape, memory format, dtype): on the CPU the U-Net's shapes at batch 16 and 64; on a GPU the sizes
# of issue 17's table (batch 128, batch 1 in bfloat16) and channels_last.
CPU_CASES = [
    ("cpu", (16, 128, 32, 32), "contiguous", "float32"),
    ("cpu", (16, 256, 16, 16), "contiguous", "float32"),
    ("cpu", (64, 64, 32, 32), "contiguous", "float32"),
    ("cpu", (16, 128, 32, 32), "channels_last", "float32"),
    ("cpu", (16, 128, 32, 32), "contiguous", "bfloat16"),
]
CUDA_CASES = [("cuda", shape, layout, dtype) for shape, layout, dtypes in (
    ((128, 128, 32, 32), "contiguous", ("float32", "bfloat16")),
    ((128, 256, 16, 16), "contiguous", ("float32", "bfloat16")),
    ((1, 128, 32, 32), "contiguous", ("bfloat16",)),
    ((128, 128, 32, 32), "channels_last", ("bfloat16",)),
) for dtype in dtypes]
CASES = CPU_CASES + (CUDA_CASES if "cuda" in DEVICES else [])


def case_id(case):
    device, shape, layout, dtype = case
    return f"{device}-{'x'.join(map(str, shape))}{'-cl' if layout == 'channels_last' else ''}-{dtype}"


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_group_norm_silu(benchmark, provider, direction, case):
    device, shape, layout, dtype = case
    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    x = (-2.3 + 0.5 * torch.randn(shape, generator=gen)).to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (1 + 0.3 * torch.randn(shape[1], generator=gen)).to(device, dtype)
    bias = (0.2 * torch.randn(shape[1], generator=gen)).to(device, dtype)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
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

    # Against float64 (DESIGN.md: 1e-5 elementwise, 1e-4 for gradients in float32; in bfloat16 twice the error
    # of PyTorch's own bfloat16 computation), whatever the provider.
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y64 = F.silu(F.group_norm(leaves64[0], GROUPS, leaves64[1], leaves64[2], 1e-5))
    refs = (y64.detach(),) if direction == "fwd" else torch.autograd.grad(y64, leaves64, dy.double())
    if dtype == torch.float32:
        limits = [1e-5] if direction == "fwd" else [1e-4] * 3
    else:
        torch_leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
        y = F.silu(F.group_norm(torch_leaves[0], GROUPS, torch_leaves[1], torch_leaves[2], 1e-5))
        torch_out = (y,) if direction == "fwd" else torch.autograd.grad(y, torch_leaves, dy)
        limits = [2 * rel_err(o, r) for o, r in zip(torch_out, refs)]
    if direction == "fwd+bwd" and provider == "fastddpm":  # the fused op keeps x's layout
        assert out[0].stride() == x.stride()
    assert out[0].shape == x.shape
    assert all(rel_err(o, r) <= limit for o, r, limit in zip(out, refs, limits))
