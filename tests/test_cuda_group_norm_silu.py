"""The CUDA kernels of fused GroupNorm+SiLU (csrc/cuda/group_norm_silu*.{cu,cpp}), called straight through
torch.ops.fastddpm, against a float64 CPU reference. GPU-only: skipped without one; tools/device_check.sh
runs them (also under compute-sanitizer memcheck, a subset).

Tolerances (DESIGN.md), relative error ‖out − ref‖ / ‖ref‖ against float64: fp32 ≤ 1e-5 for y, mean and rstd,
≤ 1e-4 for the three gradients; fp16/bf16 ≤ 2× the error of PyTorch's own F.silu(F.group_norm(...)) run at
that dtype on the same GPU, forward and backward.
"""

import pytest
import torch
import torch.nn.functional as F

from fastddpm import _extension

pytestmark = pytest.mark.cuda

EPS = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, groups): odd sizes; HW = 1 (2-D and 4-D); N = 1; 3-D and 5-D; channel counts whose D = C / G gives
# 16-, 8- and 4-byte vectors in channels-last memory; (1, 256, 64, 64) with N·G = 32 groups, fewer than the
# SMs of an A100 or H100, so each group's statistics are split across blocks; (1, 4, 128, 128): 4 rows of
# 16384, so the backward's per-channel sums are split along the rows too.
SHAPES = [
    ((2, 6, 5, 7), 3),
    ((3, 96, 9, 9), 32),
    ((4, 64), 4),  # HW = 1; not G = 32: in groups of 2, grad_x = O(eps / var) is ill-conditioned
    ((4, 32, 1, 1), 8),
    ((1, 32, 16, 16), 8),
    ((2, 48, 37), 6),
    ((2, 16, 3, 5, 7), 4),
    ((2, 128, 8, 8), 32),
    ((2, 320, 8, 8), 32),
    ((2, 512, 16, 16), 32),
    ((2, 64, 8, 8), 1),
    ((1, 256, 64, 64), 32),
    ((1, 4, 128, 128), 2),
]
LAYOUTS = ["contiguous", "channels_last", "strided", "permuted"]


def applies(layout, shape):
    """Whether the layout differs from the plain one at this rank (channels_last needs 3-D or more, permuted
    swaps the last two spatial dimensions: 4-D or more)."""
    return (not (layout == "channels_last" and len(shape) <= 2)
            and not (layout == "permuted" and len(shape) < 4))


# Every (shape, groups, layout) where the layout is a layout of its own at that rank.
LAYOUT_CASES = [(shape, groups, layout) for shape, groups in SHAPES for layout in LAYOUTS
                if applies(layout, shape)]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def case_id(value):
    """Test ids that -k can select: 2x6x5x7, G3, fp16."""
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    if isinstance(value, int):
        return f"G{value}"
    if isinstance(value, torch.dtype):
        return DTYPE_IDS[value]
    return str(value)


@pytest.fixture(scope="module")
def ops():
    assert _extension.cuda_built(), "fastddpm._C was built without its CUDA sources (FASTDDPM_CUDA=1)"
    return torch.ops.fastddpm


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def in_layout(t, layout):
    """t's values in the given memory layout (None when that layout is the plain one for t's rank)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        if t.dim() <= 2:
            return None
        return t.movedim(1, -1).contiguous().movedim(-1, 1)  # channels_last / channels_last_3d for 4-D / 5-D
    if layout == "strided":  # not dense: every other element of a wider tensor
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        view = wide[..., ::2]
        view.copy_(t)
        return view
    if layout == "permuted":  # dense, but neither contiguous nor channels-last: the last two dims swapped
        if t.dim() < 4:
            return None
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(layout)


def poison(*tensors):
    """Fill freed blocks of the caching allocator, of the outputs' sizes, with 0xFF bytes (NaN in fp32, fp16
    and bf16), so that an output element the kernels never write comes out NaN and fails the comparison."""
    blocks = [torch.full((t.numel() * t.element_size(),), 255, dtype=torch.uint8, device="cuda")
              for t in tensors]
    del blocks


def random_inputs(shape, groups, dtype, layout, affine=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (-2.3 + 0.5 * torch.randn(shape, generator=gen)).to(dtype)
    gy = torch.randn(shape, generator=gen).to(dtype)
    w = (1 + 0.3 * torch.randn(C, generator=gen)).to(dtype) if affine else None
    b = (0.2 * torch.randn(C, generator=gen)).to(dtype) if affine else None
    x = in_layout(x.cuda(), layout)
    assert x is not None, f"{layout} is not a layout of its own at rank {len(shape)}"
    gy = in_layout(gy.cuda(), layout)
    w = w.cuda() if w is not None else None
    b = b.cuda() if b is not None else None
    return x, gy, w, b


def reference(x, gy, groups, w, b):
    """float64 CPU: y, mean, rstd, and the gradients of y·gy with respect to x, w, b."""
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = w.detach().double().cpu().requires_grad_() if w is not None else None
    b64 = b.detach().double().cpu().requires_grad_() if b is not None else None
    # F.group_norm's backward with a bias but no weight fails on the CPU ("tensor does not have a device"):
    # a weight of ones, which gets no gradient, is the same function.
    w_used = w64 if w64 is not None or b64 is None else torch.ones(x.shape[1], dtype=torch.float64)
    y = F.silu(F.group_norm(x64, groups, w_used, b64, EPS))
    y.backward(gy.double().cpu())
    grouped = x64.detach().reshape(x.shape[0], groups, -1)
    mean = grouped.mean(-1)
    rstd = 1 / (grouped.var(-1, unbiased=False) + EPS).sqrt()
    return (y.detach(), mean, rstd, x64.grad,
            w64.grad if w64 is not None else None, b64.grad if b64 is not None else None)


def pytorch_errors(x, gy, groups, w, b, ref):
    """Errors of PyTorch's own unfused forward and autograd backward at x's dtype, on the GPU."""
    xt = x.detach().clone().requires_grad_()
    wt = w.detach().clone().requires_grad_() if w is not None else None
    bt = b.detach().clone().requires_grad_() if b is not None else None
    y = F.silu(F.group_norm(xt, groups, wt, bt, EPS))
    y.backward(gy)
    outs = [y, xt.grad, wt.grad if wt is not None else None, bt.grad if bt is not None else None]
    refs = [ref[0], ref[3], ref[4], ref[5]]
    return [rel_err(o, r) if o is not None else None for o, r in zip(outs, refs)]


def run(ops, x, gy, groups, w, b):
    N, C = x.shape[:2]
    poison(torch.empty_like(x), torch.empty(N, groups, device="cuda"), torch.empty(N, groups, device="cuda"))
    y, mean, rstd, silu_grad = ops.group_norm_silu(x, groups, w, b, EPS)
    assert silu_grad.shape == (0,)  # (none asked for: the CUDA backward recomputes SiLU')
    poison(torch.empty_like(x), torch.empty(C, device="cuda"), torch.empty(C, device="cuda"))
    gx, gw, gb = ops.group_norm_silu_backward(gy, x, mean, rstd, w, b, groups)
    torch.cuda.synchronize()
    return y, mean, rstd, gx, gw, gb


@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("shape,groups,layout", LAYOUT_CASES, ids=case_id)
def test_against_float64_reference(ops, shape, groups, layout, dtype):
    x, gy, w, b = random_inputs(shape, groups, dtype, layout)
    y, mean, rstd, gx, gw, gb = run(ops, x, gy, groups, w, b)

    # Outputs: x's dtype and the strides of empty_like(x) (the fake implementation's), fp32 [N, G] statistics,
    # gradients of weight and bias in their dtype.
    like = torch.empty_like(x)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == like.stride()
    assert gx.dtype == dtype and gx.shape == x.shape and gx.stride() == like.stride()
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (shape[0], groups)
    assert gw.dtype == gb.dtype == dtype and gw.shape == gb.shape == (shape[1],)

    ref = reference(x, gy, groups, w, b)
    errs = {name: rel_err(out, r) for name, out, r in
            zip(["y", "mean", "rstd", "grad_x", "grad_weight", "grad_bias"],
                [y, mean, rstd, gx, gw, gb], ref)}
    assert errs["mean"] <= 1e-5 and errs["rstd"] <= 1e-5, errs
    if dtype == torch.float32:
        limits = {"y": 1e-5, "grad_x": 1e-4, "grad_weight": 1e-4, "grad_bias": 1e-4}
    else:
        torch_errs = pytorch_errors(x, gy, groups, w, b, ref)
        limits = {name: 2 * e for name, e in zip(["y", "grad_x", "grad_weight", "grad_bias"], torch_errs)}
    bad = {name: (errs[name], limit) for name, limit in limits.items() if not errs[name] <= limit}
    assert not bad, f"(error, limit) over the limit: {bad}; all errors: {errs}"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_without_weight_or_bias(ops, affine, layout):
    shape, groups = (2, 96, 7, 9), 32
    x, gy, w, b = random_inputs(shape, groups, torch.float32, layout)
    w = w if affine == "weight" else None
    b = b if affine == "bias" else None
    y, mean, rstd, gx, gw, gb = run(ops, x, gy, groups, w, b)
    ref = reference(x, gy, groups, w, b)
    assert rel_err(y, ref[0]) <= 1e-5 and rel_err(gx, ref[3]) <= 1e-4
    for grad, param, r in [(gw, w, ref[4]), (gb, b, ref[5])]:
        if param is None:
            assert grad.numel() == 0  # the schema's empty tensor for an absent weight / bias
        else:
            assert grad.shape == param.shape and rel_err(grad, r) <= 1e-4


def test_float32_weight_with_half_input(ops):
    """weight and bias in another dtype than x: the kernels read them as float32, the gradients come back in
    their dtype. fp16 parameters widened to fp32 give the same y and grad_x, bit for bit."""
    shape, groups = (2, 64, 8, 8), 16
    x, gy, w, b = random_inputs(shape, groups, torch.float16, "channels_last")
    y16, _, _, gx16, gw16, gb16 = run(ops, x, gy, groups, w, b)
    y32, _, _, gx32, gw32, gb32 = run(ops, x, gy, groups, w.float(), b.float())
    assert gw32.dtype == gb32.dtype == torch.float32
    assert torch.equal(y16, y32) and torch.equal(gx16, gx32)
    assert torch.equal(gw16, gw32.half()) and torch.equal(gb16, gb32.half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=case_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,groups", [((1, 256, 64, 64), 32), ((8, 128, 16, 16), 32)], ids=case_id)
def test_deterministic(ops, shape, groups, layout, dtype):
    """Two runs give bit-identical outputs: every reduction (split statistics, dγ, dβ) is in a fixed order."""
    x, gy, w, b = random_inputs(shape, groups, dtype, layout)
    first = run(ops, x, gy, groups, w, b)
    second = run(ops, x, gy, groups, w, b)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_grad_y_in_another_layout(ops):
    """A contiguous grad_y for a channels_last x (as autograd may hand over) gives the same gradients."""
    shape, groups = (2, 64, 10, 12), 16
    x, gy, w, b = random_inputs(shape, groups, torch.float32, "channels_last")
    y, mean, rstd, gx, gw, gb = run(ops, x, gy, groups, w, b)
    gx2, gw2, gb2 = ops.group_norm_silu_backward(gy.contiguous(), x, mean, rstd, w, b, groups)
    assert gx2.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(gx, gx2) and torch.equal(gw, gw2) and torch.equal(gb, gb2)


def test_misaligned_views(ops):
    """Views that start 1 element into their storage take the scalar path and still match."""
    shape, groups = (2, 64, 8, 8), 16
    for dtype in DTYPES:
        base = (-2.3 + 0.5 * torch.randn(shape[0] * 64 * 64 + 1, device="cuda")).to(dtype)
        x = base[1:].view(shape)
        gy = torch.randn(shape, device="cuda").to(dtype)
        y, mean, rstd, gx, gw, gb = run(ops, x, gy, groups, None, None)
        ref = reference(x, gy, groups, None, None)
        limit = 1e-5 if dtype == torch.float32 else 2 * pytorch_errors(x, gy, groups, None, None, ref)[0]
        assert rel_err(y, ref[0]) <= limit


def test_empty(ops):
    x = torch.empty(0, 32, 4, 4, device="cuda")
    y, mean, rstd, _ = ops.group_norm_silu(x, 8, None, None, EPS)
    assert y.shape == x.shape and mean.shape == rstd.shape == (0, 8)
    w = torch.ones(32, device="cuda")
    gx, gw, gb = ops.group_norm_silu_backward(x, x, mean, rstd, w, w, 8)
    assert (gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w))
            and torch.equal(gb, torch.zeros_like(w)))


@pytest.mark.isolated
def test_bad_inputs(ops):
    x = torch.randn(2, 6, 4, 4, device="cuda")
    w = torch.ones(6, device="cuda")
    gsn = ops.group_norm_silu
    with pytest.raises(RuntimeError, match="divisible by num_groups"):
        gsn(x, 4, None, None, EPS)
    with pytest.raises(RuntimeError, match="num_groups must be positive"):
        gsn(x, 0, None, None, EPS)
    with pytest.raises(RuntimeError, match="at least 2 dimensions"):
        gsn(torch.randn(6, device="cuda"), 3, None, None, EPS)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        gsn(x.double(), 3, None, None, EPS)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        gsn(x.int(), 3, None, None, EPS)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[C\]"):
        gsn(x, 3, torch.ones(5, device="cuda"), None, EPS)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[C\]"):
        gsn(x, 3, None, torch.ones(2, 3, device="cuda"), EPS)
    with pytest.raises(RuntimeError, match="weight must be on the device of x"):
        gsn(x, 3, torch.ones(6), None, EPS)
    with pytest.raises(RuntimeError, match="bias must be a floating tensor"):
        gsn(x, 3, None, torch.ones(6, dtype=torch.int64, device="cuda"), EPS)

    with pytest.raises(RuntimeError, match="save_silu_grad=True is CPU only"):
        gsn(x, 3, w, w, EPS, True)
    y, mean, rstd, _ = gsn(x, 3, w, w, EPS)
    back = ops.group_norm_silu_backward
    with pytest.raises(RuntimeError, match="grad_y shape"):
        back(y[:1], x, mean, rstd, w, w, 3)
    with pytest.raises(RuntimeError, match="grad_y dtype"):
        back(y.half(), x, mean, rstd, w, w, 3)
    with pytest.raises(RuntimeError, match=r"mean must have shape \[N, num_groups\]"):
        back(y, x, mean[:, :2], rstd, w, w, 3)
    with pytest.raises(RuntimeError, match="rstd must be float32"):
        back(y, x, mean, rstd.half(), w, w, 3)
    with pytest.raises(RuntimeError, match="rstd must be on the device of x"):
        back(y, x, mean, rstd.cpu(), w, w, 3)
    with pytest.raises(RuntimeError, match="divisible by num_groups"):
        back(y, x, mean, rstd, w, w, 4)
    with pytest.raises(RuntimeError, match="y and silu_grad are CPU only"):
        back(y, x, mean, rstd, w, w, 3, y=y)
    with pytest.raises(RuntimeError, match="y and silu_grad are CPU only"):
        back(y, x, mean, rstd, w, w, 3, silu_grad=torch.ones_like(y))


def test_float64_on_cuda_runs_the_reference():
    """The CUDA kernels take no float64: fastddpm.functional.group_norm_silu (so GroupNormSiLU and the U-Net
    of a model in .double()) runs the reference for it on "auto", forward and backward, and says so by name
    when the C++ backend is asked for."""
    from fastddpm import functional
    from fastddpm.ops import group_norm_silu as op_slice

    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, device="cuda", dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, device="cuda", dtype=torch.float64, requires_grad=True)
    y = functional.group_norm_silu(x, 4, w, b)
    ref = F.silu(F.group_norm(x, 4, w, b, EPS))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), g)
    ref_grads = torch.autograd.grad(ref, (x, w, b), g)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        op_slice.group_norm_silu(x.detach(), 4, w.detach(), b.detach(), backend="cpp")
