"""The grid and tolerances the op tests share (tests/ops/test_<op>.py over every backend present): shapes with
odd sizes, dtypes, layouts, batches mixing t = 0, 1, T − 1, and DESIGN.md's tolerances against a float64
reference."""

import pytest
import torch

from fastddpm import reference

from .conftest import rel_err

T = 1000
SHAPES = [(3, 1, 7, 5), (1, 3, 1, 1), (1, 3, 8, 8), (64, 3, 32, 32), (5, 2, 9), (2, 3, 4, 3, 5)]
IDS = ["x".join(map(str, s)) for s in SHAPES]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OBJECTIVES = ["pred_noise", "pred_x0", "pred_v"]


def on_grid(test):
    """Parametrise a test over SHAPES × DTYPES (ids "shape-dtype")."""
    over_shapes = pytest.mark.parametrize("shape", SHAPES, ids=IDS)(test)
    return pytest.mark.parametrize("dtype", DTYPES, ids=str)(over_shapes)


def data(shape, dtype=torch.float32, channels_last=False, scale=1.0):
    x = (torch.randn(shape) * scale).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x


def timesteps(batch):
    """A batch mixing the edge steps 0, 1 and T − 1 with random ones."""
    t = torch.randint(0, T, (batch,))
    t[: min(batch, 3)] = torch.tensor([0, 1, T - 1])[: min(batch, 3)]
    return t


def tolerance(ref64, dtype, fp32_tol=1e-5, native=None):
    """DESIGN.md's bounds: fp32 ≤ 1e-5 (elementwise) or 1e-4 (reductions, gradients); fp16/bf16 ≤ twice the
    error of PyTorch's own implementation at that dtype: ``native`` = the reference math run natively in the
    low precision (see ``in_low_precision``), or, when not given or where that breaks down (DDIM's σ in
    fp16 divides 0 by 0 at t = 0), the exact result rounded to the dtype."""
    if dtype == torch.float32:
        return fp32_tol
    baseline = native if native is not None and torch.isfinite(native).all() else ref64.to(dtype)
    return max(2 * rel_err(baseline, ref64), fp32_tol)


def in_low_precision(fn, *args, **kwargs):
    """fn (a fastddpm.reference function) computing natively in its inputs' dtype, as plain PyTorch code
    written for fp16/bf16 would (the reference normally upcasts to float32)."""
    compute_dtype = reference._compute_dtype
    reference._compute_dtype = lambda dtype: dtype
    try:
        return fn(*args, **kwargs)
    finally:
        reference._compute_dtype = compute_dtype


def layouts(shape):
    return [False, True] if len(shape) == 4 else [False]


def close_to_stream(eps, expected):
    """ε as drawn (float32, then rounded to eps's dtype): within half an ulp of the dtype, plus what the log,
    sqrt, sin and cos of Box–Muller's z = √(−2 ln u₁)·cos(2π u₂) may differ by from PyTorch's (≤ 1 ulp
    each, SLEEF), for |z| ≤ √(−2 ln 1e-7) ≈ 5.7:
    * on the CPU (numpy in the interpreter, the C++ kernels): 1e-6, as measured;
    * compiled for a GPU, CUDA's own bounds (logf 1 ulp, sinf/cosf 2 ulp, a fast sqrt ≈ 2 ulp) add
      ≈ 5.7·(2 + 2)·2⁻²⁴ ≈ 1.4e-6 to z on each side, so 4e-6 there."""
    slack = 4e-6 if eps.device.type == "cuda" else 1e-6
    expected = expected.to(eps.device)
    bound = torch.finfo(eps.dtype).eps * expected.abs() / 2 + slack
    return bool(((eps.float() - expected).abs() <= bound).all())


def check_step(out, ref, dtype, native=(None, None)):
    """The outputs of a reverse step (x_prev, x̂_0) against the float64 reference's, within DESIGN.md's bounds
    (tests/ops/test_p_sample_step.py, test_ddim_step.py)."""
    for a, b, c in zip(out, ref, native):
        assert a.dtype == dtype
        assert rel_err(a, b) <= tolerance(b, dtype, native=c)


# ----------------------------------------------------------------------------- the checks of both files
# One body per check, run by tests/test_kernels.py (backend "triton", on its DEVICE) and
# tests/test_cpu_kernels.py (backend "cpp", on the CPU), so that neither backend is held to less than the
# other; every tensor a check makes is created on ``device`` (torch.device as a context), which
# test_kernels.py needs on CUDA.
