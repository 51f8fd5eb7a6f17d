"""The grid, tolerances and checks shared by the kernel tests (tests/test_kernels.py: Triton;
tests/test_cpu_kernels.py: the C++ CPU kernels): shapes with odd sizes, dtypes, layouts, batches mixing t = 0, 1,
T − 1, DESIGN.md's tolerances against a float64 reference, and the body of each check both files run, so that the
two backends are held to the same assertions."""
import itertools

import pytest
import torch

from fastddpm import reference
from fastddpm.ops.diffusion_loss import diffusion_loss
from fastddpm.ops.q_sample import philox_noise_like, q_sample

from .conftest import rel_err

T = 1000
SHAPES = [(3, 1, 7, 5), (1, 3, 1, 1), (1, 3, 8, 8), (64, 3, 32, 32), (5, 2, 9), (2, 3, 4, 3, 5)]
IDS = ["x".join(map(str, s)) for s in SHAPES]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OBJECTIVES = ["pred_noise", "pred_x0", "pred_v"]


def on_grid(test):
    """Parametrise a test over SHAPES × DTYPES (ids "shape-dtype")."""
    return pytest.mark.parametrize("dtype", DTYPES, ids=str)(pytest.mark.parametrize("shape", SHAPES, ids=IDS)(test))


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


def loss_case(sched, shape, dtype, cl, objective, gamma, reduction, drawn, backend):
    """The loss and its gradient on ``backend`` against the float64 reference (ε given or drawn)."""
    x, t = data(shape, dtype, cl), timesteps(shape[0])
    pred = data(shape, dtype, cl).requires_grad_(True)
    seed = torch.randint(0, 2**62, (1,))
    noise = None if drawn else data(shape, dtype, cl)
    eps64 = (philox_noise_like(x, seed, 3) if drawn else noise).double()
    loss = diffusion_loss(sched, pred, x, t, noise, seed=seed if drawn else None, offset=3, objective=objective,
                          min_snr_gamma=gamma, reduction=reduction, backend=backend)
    pred64 = pred.detach().double().requires_grad_(True)
    ref = reference.diffusion_loss(sched, pred64, x.double(), t, eps64, objective, gamma, reduction)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert rel_err(loss, ref) <= 1e-4 if dtype != torch.float32 else rel_err(loss, ref) <= 1e-5
    g = torch.rand_like(ref)
    (grad,) = torch.autograd.grad(loss, pred, g.float())
    (grad_ref,) = torch.autograd.grad(ref, pred64, g)
    assert grad.dtype == dtype and grad.stride() == pred.stride()
    native = None
    if dtype != torch.float32:
        pred_lp = pred.detach().clone().requires_grad_(True)
        loss_lp = in_low_precision(reference.diffusion_loss, sched, pred_lp, x, t, eps64.to(dtype), objective, gamma,
                                   reduction)
        (native,) = torch.autograd.grad(loss_lp, pred_lp, g.to(loss_lp.dtype))
    assert rel_err(grad, grad_ref) <= tolerance(grad_ref, dtype, 1e-4, native=native)


def check_step(out, ref, dtype, native=(None, None)):
    """The outputs of a reverse step (x_prev, x̂_0) against the float64 reference's, within DESIGN.md's bounds
    (tests/ops/test_p_sample_step.py, test_ddim_step.py)."""
    for a, b, c in zip(out, ref, native):
        assert a.dtype == dtype
        assert rel_err(a, b) <= tolerance(b, dtype, native=c)


# ----------------------------------------------------------------------------- the checks of both files
# One body per check, run by tests/test_kernels.py (backend "triton", on its DEVICE) and tests/test_cpu_kernels.py
# (backend "cpp", on the CPU), so that neither backend is held to less than the other; every tensor a check makes
# is created on ``device`` (torch.device as a context), which test_kernels.py needs on CUDA.
def check_loss_regenerates_the_noise_q_sample_drew(sched, backend, device):
    with torch.device(device):
        x, t, seed = data((4, 3, 8, 8)), timesteps(4), torch.tensor([42])
        _, eps = q_sample(sched, x, t, seed=seed, offset=5, write_noise=True, backend=backend)
        pred = torch.randn_like(x)
        for objective in OBJECTIVES:
            regenerated = diffusion_loss(sched, pred, x, t, seed=seed, offset=5, objective=objective, backend=backend)
            stored = diffusion_loss(sched, pred, x, t, eps, objective=objective, backend=backend)
            assert torch.equal(regenerated, stored)


def check_loss_shapes_dtypes_layouts(sched, shape, dtype, backend, device):
    with torch.device(device):
        for cl in layouts(shape):
            loss_case(sched, shape, dtype, cl, "pred_v", 5.0, "mean", drawn=True, backend=backend)


def check_loss_objectives_weights_reductions(sched, objective, backend, device):
    with torch.device(device):
        for gamma, reduction, drawn in itertools.product((None, 5.0), ("mean", "none"), (False, True)):
            loss_case(sched, (3, 2, 5, 7), torch.float32, False, objective, gamma, reduction, drawn, backend)


def check_loss_float64_and_gradients(sched, backend, device):
    """float64 data: the loss in float64, and its gradients reach x_start and ε where the reference's do."""
    with torch.device(device):
        for objective in OBJECTIVES:
            x, n, p = (torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
            t = timesteps(3)
            # min-SNR-γ: SNR from the float32 √ tables (as the kernels), the reference reads its own SNR table
            weighted = diffusion_loss(sched, p, x, t, n, objective=objective, min_snr_gamma=5.0, reduction="none",
                                      backend=backend)
            assert rel_err(weighted, reference.diffusion_loss(sched, p, x, t, n, objective, 5.0, "none")) < 1e-6
            out = diffusion_loss(sched, p, x, t, n, objective=objective, reduction="none", backend=backend)
            assert out.dtype == torch.float64
            ref = reference.diffusion_loss(sched, p, x, t, n, objective, None, "none")
            assert rel_err(out, ref) < 1e-12
            g = torch.rand(3, dtype=torch.float64)
            got = torch.autograd.grad(out, (p, x, n), g, allow_unused=True)
            want = torch.autograd.grad(ref, (p, x, n), g, allow_unused=True)
            for a, b in zip(got, want):
                assert (a is None) == (b is None or b.abs().max() == 0)
                if a is not None:
                    assert rel_err(a, b) < 1e-10
