"""group_norm_silu: fastddpm/ops/group_norm_silu.py, csrc/cpu/group_norm_silu*.cpp, csrc/cuda/group_norm_silu*

Each backend present (the reference; the C++ op on this machine's device) against a float64 oracle, forward
and gradients, and gradcheck. Then the op itself on the CPU: forward, statistics and all three gradients by
every way the backward op can form SiLU' (recomputed, from y, from silu_grad) over shapes × layouts × dtypes
(with NaN-poisoned allocations, so an unwritten element fails); gradcheck and opcheck; torch.compile; the
profiler; thread-count independence; the DEFAULT (non-AVX2) kernels; bad inputs. (CUDA specifics:
tests/test_cuda_group_norm_silu.py.)
"""

import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastddpm
from fastddpm import _extension
from fastddpm.functional import group_norm_silu
from fastddpm.nn import GroupNormSiLU
from fastddpm.ops import group_norm_silu as op_slice
from tests.conftest import rel_err
from tests.test_functional import group_norm_silu_fp64

from .conftest import backends_present, device

# The tests of the C++ op on CPU tensors (all but the first few, which run each backend present).
needs_cpp = pytest.mark.skipif(not _extension.cpu_built(), reason="needs the C++ extension (make build)")

if _extension.cpu_built():
    OP = torch.ops.fastddpm.group_norm_silu
    BACKWARD_OP = torch.ops.fastddpm.group_norm_silu_backward


def forward_op(x, num_groups, w, b, eps):
    """OP's (y, mean, rstd), with no silu_grad asked for (its fourth output: empty)."""
    y, mean, rstd, silu_grad = OP(x, num_groups, w, b, eps)
    assert silu_grad.shape == (0,)
    return y, mean, rstd


def train_op(x, num_groups, w, b, eps):
    """OP with save_silu_grad=True: (y, mean, rstd, silu_grad), what a bfloat16/float16 x trains with."""
    return OP(x, num_groups, w, b, eps, save_silu_grad=True)


def output_backward(dy, x, y, mean, rstd, w, b, num_groups):
    """BACKWARD_OP forming SiLU' from y (σ = y / z): what the CPU autograd node of float32/float64 x runs."""
    return BACKWARD_OP(dy, x, mean, rstd, w, b, num_groups, y=y)


def train_backward(dy, x, silu_grad, mean, rstd, w, b, num_groups):
    """BACKWARD_OP reading the saved silu_grad."""
    return BACKWARD_OP(dy, x, mean, rstd, w, b, num_groups, silu_grad=silu_grad)

CASES = [  # (shape, num_groups)
    ((3, 6, 5, 4), 3),          # C = 6, G = 3
    ((2, 96, 5, 7), 32),        # C = 96, G = 32, odd spatial sizes
    ((4, 64, 1, 1), 8),         # HW = 1 (groups of 8: with 2-element groups dx is pure cancellation, ill-
                                #   conditioned in float32 for any implementation, PyTorch's included)
    ((1, 64, 9, 11), 8),        # N = 1
    ((2, 16, 37), 4),           # 3-D
    ((2, 8, 3, 5, 7), 4),       # 5-D
    ((3, 12), 4),               # 2-D: [N, C]
    ((2, 3, 3, 3), 1),          # C < one vector, G = 1
    ((2, 40, 13, 64), 5),       # groups span several statistics blocks (8 × 832 elements)
    ((3, 32, 4, 4), 8),         # small groups of whole vectors per channel (4 × 16): the small-group path
    ((2, 64, 8, 8), 16),        # the same with 8 × 8 maps (4 × 64)
]
BIG = ((1, 256, 64, 64), 32)
LAYOUTS = ["contiguous", "channels_last", "view"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def make_x(shape, layout, dtype, gen):
    """x = −2.3 + 0.5·randn in the given layout: channels-last (C innermost, any rank), or a strided view."""
    if layout == "view":  # every other element of a wider tensor along the last dimension
        wide = -2.3 + 0.5 * torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)
        x = wide.to(dtype)[..., ::2]
        assert not x.is_contiguous()
        return x
    x = (-2.3 + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)  # channels_last / channels_last_3d for 4-D / 5-D
    return x


def make_params(c, dtype, gen, weight=True, bias=True):
    w = (1.0 + 0.3 * torch.randn(c, generator=gen, dtype=torch.float64)).to(dtype) if weight else None
    b = (0.2 * torch.randn(c, generator=gen, dtype=torch.float64)).to(dtype) if bias else None
    return w, b


def fp64_reference(x, num_groups, w, b, dy, eps=1e-5):
    """(y, {x, w, b gradients}) of the hand-written float64 reference at the same (rounded) inputs."""
    return grads_of(lambda x, w, b: group_norm_silu_fp64(x, num_groups, w, b, eps),
                    x.double(), w.double() if w is not None else None, b.double() if b is not None else None,
                    dy.double())


def grads_of(fn, x, w, b, dy):
    """(y, {x, w, b gradients}) of fn(x, w, b) through autograd."""
    leaves = {"x": x.detach().requires_grad_()}
    if w is not None:
        leaves["w"] = w.detach().requires_grad_()
    if b is not None:
        leaves["b"] = b.detach().requires_grad_()
    y = fn(leaves["x"], leaves.get("w"), leaves.get("b"))
    return y.detach(), dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy)))


def silu_grad_fp64(x, num_groups, w, b, eps=1e-5):
    """dSiLU/dz at z = GroupNorm(x), in float64."""
    z = F.group_norm(x.double(), num_groups, None if w is None else w.double(),
                     None if b is None else b.double(), eps)
    sig = torch.sigmoid(z)
    return sig * (1 + z * (1 - sig))


def check_case(shape, num_groups, layout, dtype, affine, seed):
    """Every way to the gradients against float64: OP through its autograd node (on the CPU SiLU' from y for
    float32/float64, σ recomputed for bfloat16), OP with save_silu_grad (the node saves SiLU'(z)), and the
    backward op called directly: recompute σ, and from y (float32/float64)."""
    gen = torch.Generator().manual_seed(seed)
    x = make_x(shape, layout, dtype, gen)
    w, b = make_params(shape[1], dtype, gen, weight=affine, bias=affine)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    ref = fp64_reference(x, num_groups, w, b, dy)
    y = check_pair(forward_op, x, num_groups, w, b, dy, ref)
    y_train = check_pair(train_op, x, num_groups, w, b, dy, ref)
    assert torch.equal(y, y_train)  # the same σ, the same rounding
    with torch.no_grad():
        y_op, mean, rstd = forward_op(x, num_groups, w, b, 1e-5)
    assert torch.equal(y_op, y)
    backward_ops = {"recompute": lambda: BACKWARD_OP(dy, x, mean, rstd, w, b, num_groups)}
    if dtype in (torch.float32, torch.float64):
        backward_ops["from y"] = lambda: output_backward(dy, x, y_op, mean, rstd, w, b, num_groups)
    for name, backward in backward_ops.items():
        gx, gw, gb = backward()
        grads = {"x": gx, **({"w": gw, "b": gb} if affine else {})}
        assert gx.stride() == torch.empty_like(x).stride(), name
        check_against_reference(x, num_groups, w, b, dy, y, grads, ref)
    return y


def check_pair(op, x, num_groups, w, b, dy, ref):
    dtype = x.dtype

    def fused(x, w, b):
        y, mean, rstd, *saved = op(x, num_groups, w, b, 1e-5)
        assert not mean.requires_grad and not rstd.requires_grad  # marked non-differentiable
        if saved:
            (silu_grad,) = saved
            assert not silu_grad.requires_grad and silu_grad.shape == x.shape
            assert silu_grad.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            ref = silu_grad_fp64(x.detach(), num_groups, w, b)
            assert rel_err(silu_grad, ref) <= (1e-12 if dtype == torch.float64 else 1e-5)
        return y

    y, grads = grads_of(fused, x, w, b, dy)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert y.stride() == torch.empty_like(x).stride()  # x's memory format, as the fake impl says
    assert grads["x"].stride() == torch.empty_like(x).stride() and grads["x"].dtype == x.dtype
    check_against_reference(x, num_groups, w, b, dy, y, grads, ref)
    return y


def check_against_reference(x, num_groups, w, b, dy, y, grads, ref):
    """y and the gradients in `grads` (keys x, w, b) within DESIGN.md's tolerances of
    ref = fp64_reference(...)."""
    dtype = x.dtype
    ref_y, ref_grads = ref
    errors = {"y": rel_err(y, ref_y), **{k: rel_err(grads[k], ref_grads[k]) for k in grads}}
    if dtype == torch.float64:
        limits = dict.fromkeys(errors, 1e-12)
    elif dtype == torch.float32:
        limits = {k: 1e-5 if k == "y" else 1e-4 for k in errors}  # elementwise; gradients (reductions)
    else:  # 2 × the error of PyTorch's own F.silu(F.group_norm) at this dtype, against the same reference
        def eager(x, w, b):
            return F.silu(F.group_norm(x, num_groups, w, b, 1e-5))

        torch_y, torch_grads = grads_of(eager, x, w, b, dy)
        torch_errors = {"y": rel_err(torch_y, ref_y)}
        torch_errors.update({k: rel_err(torch_grads[k], ref_grads[k]) for k in grads})
        limits = {k: 2 * torch_errors[k] for k in errors}
    assert all(errors[k] <= limits[k] for k in errors), (errors, limits)


# ----------------------------------------------------------------------------- each backend present
BACKENDS = backends_present("group_norm_silu")
BACKEND_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,num_groups", CASES[:4] + CASES[6:8],
                         ids=[f"{'x'.join(map(str, s))}-G{g}" for s, g in CASES[:4] + CASES[6:8]])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_fp64_reference(backend, shape, num_groups, layout, dtype, affine):
    """y and the x, weight and bias gradients through the entry of fastddpm/ops against the float64 oracle
    (float16/bfloat16: within 2× the error of PyTorch's own F.silu(F.group_norm) at that dtype)."""
    seed = zlib.crc32(repr((backend, shape, layout, dtype, affine)).encode())
    gen = torch.Generator().manual_seed(seed)
    x = make_x(shape, layout, dtype, gen).to(device())
    w, b = (None if p is None else p.to(device()) for p in make_params(shape[1], dtype, gen, affine, affine))
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device())

    def run(x, w, b):
        return op_slice.group_norm_silu(x, num_groups, w, b, 1e-5, backend=backend)

    if backend == "cpp" and x.is_cuda and dtype == torch.float64:  # the CUDA kernels take no float64
        with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16 on CUDA, got Double"):
            run(x, w, b)
        return
    y, grads = grads_of(run, x, w, b, dy)
    assert y.dtype == x.dtype and y.stride() == torch.empty_like(x).stride()
    check_against_reference(x, num_groups, w, b, dy, y, grads, fp64_reference(x, num_groups, w, b, dy))


# (the CUDA kernels take no float64: there the op's gradients are held to the oracle above; gradcheck: CPU)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if not (b == "cpp" and device().type == "cuda")])
def test_backend_gradcheck_fp64(backend):
    gen = torch.Generator().manual_seed(3)
    x = make_x((2, 6, 3, 4), "contiguous", torch.float64, gen).to(device()).requires_grad_()
    w, b = (p.to(device()).requires_grad_() for p in make_params(6, torch.float64, gen))
    assert torch.autograd.gradcheck(
        lambda x, w, b: op_slice.group_norm_silu(x, 3, w, b, 1e-5, backend=backend), (x, w, b))


# ----------------------------------------------------------------------------- the C++ op on the CPU
@needs_cpp
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,num_groups", CASES, ids=[f"{'x'.join(map(str, s))}-G{g}" for s, g in CASES])
def test_matches_fp64_reference(poisoned, shape, num_groups, layout, dtype, affine):
    seed = zlib.crc32(repr((shape, layout, dtype, affine)).encode())
    check_case(shape, num_groups, layout, dtype, affine, seed)


@needs_cpp
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_fp64_reference_large(poisoned, layout):
    check_case(*BIG, layout, torch.float32, True, seed=7)


@needs_cpp
@pytest.mark.parametrize("weight,bias", [(True, False), (False, True)])
def test_weight_or_bias_alone(poisoned, weight, bias):
    gen = torch.Generator().manual_seed(8)
    x = make_x((2, 12, 5, 3), "contiguous", torch.float32, gen)
    w, b = make_params(12, torch.float32, gen, weight, bias)
    dy = torch.randn(x.shape, generator=gen)
    y, grads = grads_of(lambda x, w, b: group_norm_silu(x, 3, w, b), x, w, b, dy)
    ref_y, ref_grads = fp64_reference(x, 3, w, b, dy)
    assert rel_err(y, ref_y) <= 1e-5
    assert set(grads) == set(ref_grads) and all(rel_err(grads[k], ref_grads[k]) <= 1e-4 for k in grads)
    # The raw backward returns empty tensors for the missing parameter.
    _, mean, rstd = forward_op(x, 3, w, b, 1e-5)
    _, gw, gb = BACKWARD_OP(dy, x, mean, rstd, w, b, 3)
    assert (gw.numel() == 0) == (w is None) and (gb.numel() == 0) == (b is None)


@needs_cpp
@pytest.mark.parametrize("save_silu_grad", [False, True], ids=["op", "save-silu-grad"])
def test_autograd_returns_each_gradient_asked_for(save_silu_grad):
    """The C++ autograd node (csrc/autograd.cpp) routes the backward's gradients to x, weight
    and bias by the tensors given: every subset requiring grad, with the weight or the bias absent, in float64
    against autograd of the composite."""
    gen = torch.Generator().manual_seed(21)
    x0 = make_x((2, 6, 3, 5), "contiguous", torch.float64, gen)
    w0, b0 = make_params(6, torch.float64, gen)
    dy = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    for has_w in (True, False):
        for has_b in (True, False):
            for wanted in range(1, 8):  # bit 0: x, bit 1: weight, bit 2: bias
                x = x0.clone().requires_grad_(bool(wanted & 1))
                w = w0.clone().requires_grad_(bool(wanted & 2)) if has_w else None
                b = b0.clone().requires_grad_(bool(wanted & 4)) if has_b else None
                inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
                if not inputs:
                    continue
                grads = torch.autograd.grad(OP(x, 3, w, b, 1e-5, save_silu_grad)[0], inputs, dy)
                z = F.group_norm(x, 3, eps=1e-5)  # (F.group_norm's own backward fails for a bias alone)
                z = z * w[:, None, None] if w is not None else z
                z = z + b[:, None, None] if b is not None else z
                expected = torch.autograd.grad(F.silu(z), inputs, dy)
                assert all(rel_err(g, e) <= 1e-12 for g, e in zip(grads, expected)), (has_w, has_b, wanted)


@needs_cpp
def test_torch_func_transforms_and_compiled_autograd():
    """torch.func refuses C++ autograd Functions: under a transform the functional runs the reference (same
    gradient as the composite). Compiled autograd traces the C++ node (it refuses nodes that marked outputs
    non-differentiable: mean, rstd and silu_grad leave the node detached instead)."""
    gen = torch.Generator().manual_seed(23)
    x = make_x((2, 8, 4, 4), "contiguous", torch.float64, gen)
    w, b = make_params(8, torch.float64, gen)
    grad = torch.func.grad(lambda x: group_norm_silu(x, 4, w, b).square().sum())(x)
    expected = torch.func.grad(lambda x: F.silu(F.group_norm(x, 4, w, b)).square().sum())(x)
    assert rel_err(grad, expected) <= 1e-12

    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), GroupNormSiLU(4, 8))
    inputs = torch.randn(2, 8, 4, 4, generator=gen)
    model(inputs).square().sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
        model(inputs).square().sum().backward()  # an eager forward: the backward graph holds the C++ node
    assert all(rel_err(p.grad, e) <= 1e-5 for p, e in zip(model.parameters(), eager))
    torch._dynamo.reset()


@needs_cpp
def test_permuted_dense_layout(poisoned):
    # Dense but neither NCHW nor channels-last (batch not outermost): y and dx follow empty_like(x).
    gen = torch.Generator().manual_seed(9)
    x = make_x((6, 3, 5, 4), "contiguous", torch.float32, gen).transpose(0, 1)  # [3, 6, 5, 4]
    w, b = make_params(6, torch.float32, gen)
    dy = torch.randn(x.shape, generator=gen)
    y, grads = grads_of(lambda x, w, b: OP(x, 3, w, b, 1e-5)[0], x, w, b, dy)
    assert y.stride() == torch.empty_like(x).stride() == x.stride()
    ref_y, ref_grads = fp64_reference(x, 3, w, b, dy)
    assert rel_err(y, ref_y) <= 1e-5 and all(rel_err(grads[k], ref_grads[k]) <= 1e-4 for k in grads)


@needs_cpp
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_statistics(layout, dtype):
    gen = torch.Generator().manual_seed(10)
    x = make_x((3, 32, 9, 7), layout, dtype, gen)
    _, mean, rstd = forward_op(x, 8, None, None, 1e-5)
    assert mean.shape == rstd.shape == (3, 8)
    assert mean.dtype == rstd.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    g = x.double().reshape(3, 8, -1)
    ref_mean = g.mean(-1)
    ref_rstd = 1 / torch.sqrt((g - ref_mean[..., None]).square().mean(-1) + 1e-5)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel_err(mean, ref_mean) <= tol and rel_err(rstd, ref_rstd) <= tol


@needs_cpp
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_variance_of_a_large_offset_is_accurate(layout):
    # mean/std = 3·10⁴: E[x²] − E[x]² in float32 would lose every digit of the variance here.
    gen = torch.Generator().manual_seed(11)
    x = (300.0 + 0.01 * torch.randn(2, 16, 24, 24, generator=gen, dtype=torch.float64)).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _, mean, rstd = forward_op(x, 4, None, None, 1e-12)
    g = x.double().reshape(2, 4, -1)
    ref_rstd = 1 / torch.sqrt((g - g.mean(-1, keepdim=True)).square().mean(-1) + 1e-12)
    assert rel_err(rstd, ref_rstd) <= 1e-4
    assert rel_err(mean, g.mean(-1)) <= 1e-7


@needs_cpp
def test_constant_group_gives_bias():
    # Variance 0: x̂ = 0 exactly, so y = SiLU(bias) (no cancellation error scaled by 1/sqrt(eps)).
    x = torch.full((2, 4, 3, 3), 1.7)
    x[:, 2:] = -2.3 + 0.5 * torch.randn(2, 2, 3, 3)
    w, b = torch.randn(4), torch.randn(4)
    y = OP(x, 2, w, b, 1e-5)[0]
    expected = F.silu(b[:2]).view(1, 2, 1, 1).expand(2, 2, 3, 3)
    torch.testing.assert_close(y[:, :2], expected, rtol=1e-6, atol=1e-7)


@needs_cpp
def test_mixed_dtype_bfloat16_x_float32_params():
    gen = torch.Generator().manual_seed(12)
    x = make_x((2, 32, 6, 6), "contiguous", torch.bfloat16, gen)
    w, b = make_params(32, torch.float32, gen)
    dy = torch.randn(x.shape, generator=gen).bfloat16()
    y, grads = grads_of(lambda x, w, b: group_norm_silu(x, 8, w, b), x, w, b, dy)
    assert y.dtype == grads["x"].dtype == torch.bfloat16
    assert grads["w"].dtype == grads["b"].dtype == torch.float32
    torch_y, torch_grads = grads_of(lambda x, w, b: F.silu(F.group_norm(x, 8, w, b)), x, w, b, dy)
    ref_y, ref_grads = fp64_reference(x, 8, w, b, dy)
    assert rel_err(y, ref_y) <= 2 * rel_err(torch_y, ref_y)
    assert all(rel_err(grads[k], ref_grads[k]) <= 2 * rel_err(torch_grads[k], ref_grads[k]) for k in grads)


@needs_cpp
def test_empty_inputs():
    for shape in [(0, 4, 3, 3), (2, 4, 0)]:
        x = torch.randn(shape, requires_grad=True)
        y = group_norm_silu(x, 2, torch.ones(4), torch.zeros(4))
        assert y.shape == x.shape
        (gx,) = torch.autograd.grad(y.sum(), x)
        assert gx.shape == x.shape


# ----------------------------------------------------------------------------- autograd, registration
@needs_cpp
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_fp64(layout):
    gen = torch.Generator().manual_seed(13)
    x = make_x((2, 6, 3, 4), layout, torch.float64, gen).requires_grad_()
    w, b = make_params(6, torch.float64, gen)
    w.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: OP(x, 3, w, b, 1e-5)[0], (x, w, b))
    assert torch.autograd.gradcheck(lambda x: OP(x, 2, None, None, 1e-3)[0], (x,))


def opcheck_args():
    gen = torch.Generator().manual_seed(14)
    cases = []
    for shape, g, layout, dtype, affine in [((2, 6, 5, 3), 3, "contiguous", torch.float32, True),
                                            ((2, 8, 4, 3), 4, "channels_last", torch.float32, True),
                                            ((3, 4, 7), 2, "contiguous", torch.float64, False),
                                            ((2, 16, 3, 3), 4, "contiguous", torch.bfloat16, True)]:
        x = make_x(shape, layout, dtype, gen)
        w, b = make_params(shape[1], dtype, gen, affine, affine)
        cases.append((x, g, w, b))
    return cases


def opcheck_forward_args():
    """opcheck_args with x, weight and bias requiring grad (but bfloat16: its gradcheck is not meaningful)."""
    for x, g, w, b in opcheck_args():
        x = x.requires_grad_(x.dtype != torch.bfloat16)
        if w is not None:
            w, b = w.requires_grad_(x.requires_grad), b.requires_grad_(x.requires_grad)
        yield x, g, w, b


@needs_cpp
def test_opcheck_forward():
    for x, g, w, b in opcheck_forward_args():
        torch.library.opcheck(OP.default, (x, g, w, b, 1e-5))


@needs_cpp
def test_opcheck_backward():
    """The backward op with each thing the forward may save: nothing (σ recomputed), y, silu_grad."""
    for x, g, w, b in opcheck_args():
        _, mean, rstd = forward_op(x, g, w, b, 1e-5)
        torch.library.opcheck(BACKWARD_OP.default, (torch.randn_like(x), x, mean, rstd, w, b, g))


@needs_cpp
def test_opcheck_backward_from_y():
    for x, g, w, b in opcheck_args():
        if x.dtype == torch.bfloat16:
            continue  # refused (test_bad_inputs_backward_op_with_a_saved_tensor)
        y, mean, rstd = forward_op(x, g, w, b, 1e-5)
        torch.library.opcheck(BACKWARD_OP.default, (torch.randn_like(x), x, mean, rstd, w, b, g, y, None))


@needs_cpp
def test_opcheck_save_silu_grad():
    for x, g, w, b in opcheck_forward_args():
        torch.library.opcheck(OP.default, (x, g, w, b, 1e-5, True))
        with torch.no_grad():
            _, mean, rstd, silu_grad = train_op(x, g, w, b, 1e-5)
        torch.library.opcheck(BACKWARD_OP.default,
                              (torch.randn_like(x), x.detach(), mean, rstd, None if w is None else w.detach(),
                               None if b is None else b.detach(), g, None, silu_grad))


@needs_cpp
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_save_silu_grad_gradcheck_fp64(layout):
    gen = torch.Generator().manual_seed(17)
    x = make_x((2, 6, 3, 4), layout, torch.float64, gen).requires_grad_()
    w, b = make_params(6, torch.float64, gen)
    assert torch.autograd.gradcheck(lambda x, w, b: train_op(x, 3, w, b, 1e-5)[0],
                                    (x, w.requires_grad_(), b.requires_grad_()))


class OpCalls(TorchDispatchMode):
    """Records each fastddpm op call below autograd: (op, save_silu_grad) for the forward, (op, what SiLU' is
    formed from: "y", "silu_grad" or "recomputed") for the backward."""

    def __init__(self):
        super().__init__()
        self.calls = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastddpm":
            named = dict(zip((a.name for a in func._schema.arguments), args), **kwargs)
            if func.name() == "fastddpm::group_norm_silu":
                self.calls.add((func.name(), bool(named.get("save_silu_grad", False))))
            else:
                saved = [k for k in ("y", "silu_grad") if named.get(k) is not None]
                self.calls.add((func.name(), saved[0] if saved else "recomputed"))
        return func(*args, **kwargs)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_functional_picks_what_the_backward_reads_by_dtype_and_grad(dtype):
    """CPU: float32/float64 nodes keep y, from which the backward forms SiLU'; bfloat16/float16 ask the
    forward for silu_grad when a gradient is needed (and for nothing, with no node, when none is)."""
    x, w, b = (torch.randn(2, 8, 3, 3).to(dtype), torch.randn(8).to(dtype), torch.randn(8).to(dtype))
    reduced = dtype in (torch.bfloat16, torch.float16)

    def ops_run(**requires):
        xs = [t.detach().requires_grad_(requires.get(k, False)) for k, t in zip("xwb", (x, w, b))]
        with OpCalls() as mode:
            y = group_norm_silu(*xs[:1], 4, *xs[1:])
            if y.requires_grad:
                y.sum().backward()
        return mode.calls

    forward = ("fastddpm::group_norm_silu", False)
    trained = ({("fastddpm::group_norm_silu", True), ("fastddpm::group_norm_silu_backward", "silu_grad")}
               if reduced else {forward, ("fastddpm::group_norm_silu_backward", "y")})
    assert ops_run() == {forward}
    assert ops_run(x=True) == ops_run(w=True) == ops_run(b=True) == trained
    with torch.no_grad():
        assert ops_run(x=True) == {forward}


@needs_cpp
def test_backward_after_an_in_place_change_of_y_raises():
    """The float32 CPU backward reads y: autograd's version check refuses a y changed in place (as for
    torch.sigmoid), instead of a wrong gradient. An out-of-place change is fine."""
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    y = group_norm_silu(x, 4)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    y = group_norm_silu(x, 4)
    (2 * y).sum().backward()
    assert rel_err(x.grad, torch.autograd.grad((2 * F.silu(F.group_norm(x, 4))).sum(), x)[0]) <= 1e-5


class ConvNormAct(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.norm = GroupNormSiLU(4, 16)

    def forward(self, x):
        return self.norm(self.conv(x))


@needs_cpp
def test_compile_fullgraph_module():
    torch.manual_seed(15)
    model = ConvNormAct()
    with torch.no_grad():
        model.norm.weight.normal_(1.0, 0.3)
        model.norm.bias.normal_(0.0, 0.2)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    y, y_ref = compiled(x), model(x)
    assert rel_err(y, y_ref) <= 1e-6
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *model.parameters()], dy)
    grads_ref = torch.autograd.grad(y_ref, [x, *model.parameters()], dy)
    assert all(rel_err(g, r) <= 1e-5 for g, r in zip(grads, grads_ref))


@needs_cpp
def test_profiler_shows_the_fused_op():
    model = GroupNormSiLU(8, 32)
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x).sum().backward()
    names = {e.name for e in prof.events()}
    assert "fastddpm::group_norm_silu" in names and "fastddpm::group_norm_silu_backward" in names
    assert not names & {"aten::group_norm", "aten::native_group_norm", "aten::native_group_norm_backward",
                        "aten::silu", "aten::silu_backward"}


@needs_cpp
def test_backend_choice(monkeypatch):
    assert fastddpm.build_info()["backends"]["cpu"]["group_norm_silu"] == "cpp"
    x = torch.randn(2, 8, 3, 3)
    w, b = torch.randn(8), torch.randn(8)
    for backend in ("cpp", "reference"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = op_slice.group_norm_silu(x, 4, w, b, 1e-5, backend=backend)
        names = {e.name for e in prof.events()}
        assert ("fastddpm::group_norm_silu" in names) == (backend == "cpp")
        assert rel_err(y, group_norm_silu_fp64(x, 4, w, b)) <= 1e-5
    monkeypatch.setenv("FASTDDPM_BACKEND", "reference")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        group_norm_silu(x, 4, w, b)
    assert "fastddpm::group_norm_silu" not in {e.name for e in prof.events()}


# ----------------------------------------------------------------------------- determinism, capabilities
@needs_cpp
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_independent_of_thread_count(layout, dtype):
    # Many groups and (channels-last) many row chunks per sample, so the threads' shares differ.
    gen = torch.Generator().manual_seed(16)
    x = make_x((6, 64, 24, 40), layout, dtype, gen)
    w, b = make_params(64, dtype, gen)
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y, mean, rstd = forward_op(x, 32, w, b, 1e-5)
            results.append((y, mean, rstd, *BACKWARD_OP(dy, x, mean, rstd, w, b, 32)))
            if dtype == torch.float32:
                results[-1] += output_backward(dy, x, y, mean, rstd, w, b, 32)
            y, mean, rstd, silu_grad = train_op(x, 32, w, b, 1e-5)
            results[-1] += (y, mean, rstd, silu_grad, *train_backward(dy, x, silu_grad, mean, rstd, w, b, 32))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@needs_cpp
def test_default_capability_kernels():
    # The kernels compiled without AVX2 (what a CPU without it runs), chosen by ATEN_CPU_CAPABILITY=default.
    code = """
import torch
from tests.ops.test_group_norm_silu import check_case
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
for i, (shape, g, layout, dtype) in enumerate([((3, 6, 5, 4), 3, "contiguous", torch.float32),
                                              ((2, 20, 5, 7), 5, "channels_last", torch.float32),
                                              ((2, 16, 9), 4, "view", torch.float64),
                                              ((2, 12, 4, 5), 4, "contiguous", torch.bfloat16),
                                              ((2, 12, 4, 5), 4, "channels_last", torch.bfloat16),
                                              ((2, 16, 4, 4), 4, "contiguous", torch.float32)]):
    check_case(shape, g, layout, dtype, True, seed=i)
print("ok")
"""
    import os

    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert r.returncode == 0 and r.stdout.split()[-1] == "ok", r.stderr[-3000:]


# ----------------------------------------------------------------------------- bad inputs
X6 = torch.randn(2, 6, 3)


@needs_cpp
@pytest.mark.parametrize(
    "x,num_groups,weight,bias,match",
    [
        (X6, 4, None, None, r"number of channels C = 6 \(x.shape\[1\]\) must be divisible by num_groups = 4"),
        (X6, 0, None, None, "num_groups must be positive"),
        (X6, 3, torch.ones(5), None, r"weight must be 1-D of size C = 6 \(x.shape\[1\]\), got shape \[5\]"),
        (X6, 3, None, torch.ones(6, 1), r"bias must be 1-D of size C = 6"),
        (X6, 3, torch.ones(6, dtype=torch.float64), None, "weight dtype Double does not match x dtype Float"),
        (X6, 3, torch.ones(6), torch.ones(6).double(), "bias dtype Double does not match x dtype Float"),
        (X6.bfloat16(), 3, torch.ones(6), torch.ones(6).bfloat16(), "weight and bias must have the same"),
        (torch.ones(2, 4, 3).long(), 2, None, None, "x must be a floating-point tensor .* got Long"),
        (torch.randn(4), 2, None, None, r"x must have at least 2 dimensions \[N, C, \*\], got shape \[4\]"),
    ],
)
@pytest.mark.isolated
def test_bad_inputs_raw_op(x, num_groups, weight, bias, match):
    with pytest.raises(RuntimeError, match=match):
        OP(x, num_groups, weight, bias, 1e-5)


@needs_cpp
@pytest.mark.isolated
def test_bad_inputs_raw_backward_op():
    x = torch.randn(2, 6, 3)
    _, mean, rstd = forward_op(x, 3, None, None, 1e-5)
    dy = torch.randn_like(x)
    with pytest.raises(RuntimeError, match=r"mean must have shape \[N, num_groups\] = \[2, 3\], got \[2, 2"):
        BACKWARD_OP(dy, x, mean[:, :2], rstd, None, None, 3)
    with pytest.raises(RuntimeError, match=r"rstd must have shape \[N, num_groups\] = \[2, 3\], got \[6\]"):
        BACKWARD_OP(dy, x, mean, rstd.reshape(6), None, None, 3)
    with pytest.raises(RuntimeError, match="mean must be Float for a Float x, got Double"):
        BACKWARD_OP(dy, x, mean.double(), rstd, None, None, 3)
    with pytest.raises(RuntimeError, match=r"grad_y shape \[2, 6, 2\] must match x shape \[2, 6, 3\]"):
        BACKWARD_OP(dy[..., :2], x, mean, rstd, None, None, 3)
    with pytest.raises(RuntimeError, match="grad_y dtype Double must match x dtype Float"):
        BACKWARD_OP(dy.double(), x, mean, rstd, None, None, 3)
    with pytest.raises(RuntimeError, match="must be divisible by num_groups = 4"):
        BACKWARD_OP(dy, x, mean, rstd, None, None, 4)
    with pytest.raises(RuntimeError, match="weight must be 1-D of size C = 6"):
        BACKWARD_OP(dy, x, mean, rstd, torch.ones(3), None, 3)


@needs_cpp
def test_silu_grad_from_y_at_the_extremes():
    """σ = y / z where z is 0 (0/0: σ = 1/2 instead), tiny, and where σ saturates (z far below 0 or above):
    finite gradients, equal to recomputing σ within float32 rounding."""
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(2, 8, 4, 4, generator=gen)
    w = torch.tensor([1.0, 1e-30, 0.0, 200.0, -200.0, 1.0, 50.0, -50.0])
    b = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -120.0, 0.0, 95.0])
    dy = torch.randn(x.shape, generator=gen)
    y, mean, rstd = forward_op(x, 4, w, b, 1e-5)
    from_y = output_backward(dy, x, y, mean, rstd, w, b, 4)
    recomputed = BACKWARD_OP(dy, x, mean, rstd, w, b, 4)
    assert all(torch.isfinite(t).all() for t in from_y)
    errors = [rel_err(a, r) for a, r in zip(from_y, recomputed)]
    assert all(e <= 1e-5 for e in errors), errors


@needs_cpp
@pytest.mark.isolated
@pytest.mark.parametrize("name", ["y", "silu_grad"])
def test_bad_inputs_backward_op_with_a_saved_tensor(name):
    """The backward op given y (SiLU' from the output) or silu_grad (saved by the forward)."""
    x = torch.randn(2, 6, 3)
    if name == "y":
        backward = output_backward
        saved, mean, rstd = forward_op(x, 3, None, None, 1e-5)
    else:
        backward = train_backward
        _, mean, rstd, saved = train_op(x, 3, None, None, 1e-5)
    dy = torch.randn_like(x)
    with pytest.raises(RuntimeError, match=rf"{name} shape \[2, 6, 2\] must match x shape \[2, 6, 3\]"):
        backward(dy, x, saved[..., :2], mean, rstd, None, None, 3)
    with pytest.raises(RuntimeError, match=f"{name} must be Float for a Float x, got Double"):
        backward(dy, x, saved.double(), mean, rstd, None, None, 3)
    with pytest.raises(RuntimeError, match="mean must be Float for a Float x, got Double"):
        backward(dy, x, saved, mean.double(), rstd, None, None, 3)
    # a saved tensor in another layout than x's is read correctly (copied into x's layout)
    ref = backward(dy, x, saved, mean, rstd, None, None, 3)
    other = saved.transpose(1, 2).contiguous().transpose(1, 2)
    assert all(torch.equal(a, b) for a, b in zip(ref, backward(dy, x, other, mean, rstd, None, None, 3)))
    if name == "y":  # a bfloat16 y holds too few bits of σ: the backward refuses it
        xb = x.bfloat16()
        yb, mean_b, rstd_b = forward_op(xb, 3, None, None, 1e-5)
        with pytest.raises(RuntimeError, match="a y argument needs a float32 or float64 x .* got BFloat16"):
            backward(dy.bfloat16(), xb, yb, mean_b, rstd_b, None, None, 3)
    else:  # what the forward saved is one of the two, never both
        y, *_ = forward_op(x, 3, None, None, 1e-5)
        with pytest.raises(RuntimeError, match="pass y or silu_grad .*, not both"):
            BACKWARD_OP(dy, x, mean, rstd, None, None, 3, y=y, silu_grad=saved)


@needs_cpp
@pytest.mark.parametrize(
    "x,num_groups,weight,exc,match",
    [
        (X6, 4, None, ValueError, r"channels \(6\) must be divisible by num_groups \(4\)"),
        (X6, 3, torch.ones(5), ValueError, r"weight must be 1-D of size C=6 .* \(5,\)"),
        (torch.ones(2, 4, 3, dtype=torch.int64), 2, None, TypeError, "floating-point"),
        (torch.randn(4), 2, None, ValueError, "at least 2 dimensions"),
        ([[1.0, 2.0]], 1, None, TypeError, "x must be a torch.Tensor, got list"),
        (X6, 3, [1.0] * 6, TypeError, "weight must be a torch.Tensor or None, got list"),
        (X6, True, None, ValueError, "num_groups must be a positive int, got True"),
        (X6, 0, None, ValueError, "num_groups must be a positive int, got 0"),
        # (bfloat16 x: the training-pair test reads weight.requires_grad first)
        (X6.bfloat16(), 3, [1.0] * 6, TypeError, "weight must be a torch.Tensor or None, got list"),
        # a problem only the op itself checks (the reference's F.group_norm: "parameter"): its error,
        # unchanged
        (X6, 3, torch.ones(6, dtype=torch.float64), RuntimeError, "weight|parameter"),
    ],
)
@pytest.mark.isolated
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_inputs_functional(monkeypatch, x, num_groups, weight, exc, match, backend):
    """The same errors whether the C++ op runs (it checks its arguments; the Python checks run only after it
    raised, for their messages) or the reference (the checks run first)."""
    monkeypatch.setenv("FASTDDPM_BACKEND", backend)
    with pytest.raises(exc, match=match) as raised:
        group_norm_silu(x, num_groups, weight)
    assert raised.value.__context__ is None or exc is RuntimeError  # not chained to the C++ op's error


@needs_cpp
@pytest.mark.parametrize(
    "x,num_groups,weight,exc,match",
    [
        (X6, 4, None, ValueError, r"channels \(6\) must be divisible by num_groups \(4\)"),
        (X6, 3, torch.ones(8, 1), ValueError, r"weight must be 1-D of size C=6"),
        (torch.ones(2, 4, 3, dtype=torch.int64), 2, None, TypeError, "floating-point"),
    ],
)
@pytest.mark.isolated
def test_bad_inputs_functional_compiled(x, num_groups, weight, exc, match):
    """Under torch.compile the checks run while tracing: the same errors as eager."""
    torch._dynamo.reset()
    with pytest.raises(exc, match=match):
        torch.compile(lambda x, w: group_norm_silu(x, num_groups, w), backend="eager")(x, weight)
