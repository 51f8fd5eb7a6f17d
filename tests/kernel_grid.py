"""The grid and tolerances shared by the kernel tests (tests/test_kernels.py: Triton; tests/test_cpu_kernels.py:
the C++ CPU kernels): shapes with odd sizes, dtypes, layouts, batches mixing t = 0, 1, T − 1, and DESIGN.md's
tolerances against a float64 reference."""
import torch

from fastddpm import reference
from fastddpm.ops.diffusion_loss import diffusion_loss
from fastddpm.ops.q_sample import philox_noise_like

from .conftest import rel_err

T = 1000
SHAPES = [(3, 1, 7, 5), (1, 3, 1, 1), (1, 3, 8, 8), (64, 3, 32, 32), (5, 2, 9), (2, 3, 4, 3, 5)]
IDS = ["x".join(map(str, s)) for s in SHAPES]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OBJECTIVES = ["pred_noise", "pred_x0", "pred_v"]


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
    for a, b, c in zip(out, ref, native):
        assert a.dtype == dtype
        assert rel_err(a, b) <= tolerance(b, dtype, native=c)
