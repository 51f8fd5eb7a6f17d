"""The grid, tolerances and checks shared by the kernel tests (tests/test_kernels.py: Triton;
tests/test_cpu_kernels.py: the C++ CPU kernels): shapes with odd sizes, dtypes, layouts, batches mixing t = 0, 1,
T − 1, DESIGN.md's tolerances against a float64 reference, and the body of each check both files run, so that the
two backends are held to the same assertions."""
import itertools

import pytest
import torch

from fastddpm import reference
from fastddpm.ops.q_sample import philox_noise_like, q_sample
from fastddpm.ops.reverse_step import ddim_step, p_sample_step

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


def check_step(out, ref, dtype, native=(None, None)):
    for a, b, c in zip(out, ref, native):
        assert a.dtype == dtype
        assert rel_err(a, b) <= tolerance(b, dtype, native=c)


# ----------------------------------------------------------------------------- the checks of both files
# One body per check, run by tests/test_kernels.py (backend "triton", on its DEVICE) and tests/test_cpu_kernels.py
# (backend "cpp", on the CPU), so that neither backend is held to less than the other; every tensor a check makes
# is created on ``device`` (torch.device as a context), which test_kernels.py needs on CUDA.
def check_q_sample_given_noise(sched, shape, dtype, backend, device):
    with torch.device(device):
        for cl in layouts(shape):
            x, n, t = data(shape, dtype, cl), data(shape, dtype, cl), timesteps(shape[0])
            out = q_sample(sched, x, t, n, backend=backend)
            ref = reference.q_sample(sched, x.double(), t, n.double())
            assert out.dtype == dtype and out.shape == x.shape
            assert out.stride() == x.stride()  # the layout is kept
            native = in_low_precision(reference.q_sample, sched, x, t, n)
            assert rel_err(out, ref) <= tolerance(ref, dtype, native=native)


def check_q_sample_drawn_noise(sched, shape, dtype, backend, device):
    with torch.device(device):
        for cl in layouts(shape):
            x, t, seed = data(shape, dtype, cl), timesteps(shape[0]), torch.randint(0, 2**62, (1,))
            out, eps = q_sample(sched, x, t, seed=seed, offset=17, write_noise=True, backend=backend)
            assert out.dtype == eps.dtype == dtype and out.shape == x.shape
            assert out.stride() == eps.stride() == x.stride()
            # the ε written is the reference Philox stream, and x_t is q_sample with it
            expected = philox_noise_like(x, seed, 17)
            assert close_to_stream(eps, expected)
            ref = reference.q_sample(sched, x.double(), t, expected.double())
            native = in_low_precision(reference.q_sample, sched, x, t, expected.to(dtype))
            assert rel_err(out, ref) <= tolerance(ref, dtype, native=native)
            out2, none = q_sample(sched, x, t, seed=seed, offset=17, backend=backend)
            assert none.numel() == 0 and torch.equal(out2, out)  # same (seed, offset) → same noise


def check_odd_layout_is_made_dense(sched, backend, device):
    """Inputs that are not batch-outer dense: outputs come back contiguous, with the values of dense inputs."""
    with torch.device(device):
        x = torch.randn(4, 6, 5, 3)[:, ::2]  # not dense
        n, t, seed = torch.randn_like(x), timesteps(4), torch.tensor([4])
        out = q_sample(sched, x, t, n, backend=backend)
        assert rel_err(out, reference.q_sample(sched, x.double(), t, n.double())) < 1e-6
        out, eps = q_sample(sched, x, t, seed=seed, write_noise=True, backend=backend)
        assert out.is_contiguous() and eps.is_contiguous()
        assert rel_err(out, reference.q_sample(sched, x.double(), t, eps.double())) < 1e-6
        o = torch.randn(4, 6, 5, 3)[:, ::2]
        x_prev, x0, _ = p_sample_step(sched, o, x, t, torch.randn(4, 3, 5, 3), backend=backend)
        assert x_prev.is_contiguous() and x0.is_contiguous()


def check_p_sample_step_shapes_dtypes_layouts(sched, shape, dtype, backend, device):
    with torch.device(device):
        for cl in layouts(shape):
            x, o, n, t = data(shape, dtype, cl, 2), data(shape, dtype, cl), data(shape, dtype, cl), timesteps(shape[0])
            x_prev, x0, none = p_sample_step(sched, o, x, t, n, objective="pred_v", write_noise=True, backend=backend)
            assert x_prev.stride() == x0.stride() == x.stride() and none.numel() == 0  # noise given: not written
            ref = reference.p_sample_step(sched, o.double(), x.double(), t, n.double(), "pred_v")
            native = in_low_precision(reference.p_sample_step, sched, o, x, t, n, "pred_v")
            check_step((x_prev, x0), ref, dtype, native)


def check_p_sample_step_objectives_variances_limits(sched, objective, variance, backend, device):
    with torch.device(device):
        for clip, threshold in ((True, None), (False, None), (2.5, None), (True, (0.9, 1.5))):
            x, o, n, t = data((4, 3, 5, 6), scale=2), data((4, 3, 5, 6)), data((4, 3, 5, 6)), timesteps(4)
            out = p_sample_step(sched, o, x, t, n, objective=objective, variance=variance, clip_denoised=clip,
                                threshold=threshold, backend=backend)
            ref = reference.p_sample_step(sched, o.double(), x.double(), t, n.double(), objective, variance, clip,
                                          threshold)
            check_step(out[:2], ref, torch.float32)


def check_p_sample_step_drawn_noise_and_t0(sched, backend, device):
    with torch.device(device):
        x, o, t, seed = data((4, 3, 6, 6)), data((4, 3, 6, 6)), timesteps(4), torch.tensor([9])
        x_prev, x0, z = p_sample_step(sched, o, x, t, seed=seed, offset=11, write_noise=True, backend=backend)
        assert close_to_stream(z, philox_noise_like(x, seed, 11))
        ref = reference.p_sample_step(sched, o.double(), x.double(), t, z.double())
        check_step((x_prev, x0), ref, torch.float32)
        # t = 0 (sample 0): x_{t−1} is the posterior mean alone, whatever z
        mean0 = sched.posterior_mean_coef1[0].double() * x0[0].double() + sched.posterior_mean_coef2[0].double() * x[0]
        assert rel_err(x_prev[0], mean0) < 1e-6 and rel_err(x_prev[0], ref[0][0]) < 1e-6
        _, x0_none, z_none = p_sample_step(sched, o, x, t, seed=seed, write_x0=False, backend=backend)
        assert x0_none.numel() == 0 and z_none.numel() == 0


def check_ddim_step_shapes_dtypes_layouts(sched, shape, dtype, backend, device):
    with torch.device(device):
        for cl in layouts(shape):
            x, o, n, t = data(shape, dtype, cl, 2), data(shape, dtype, cl), data(shape, dtype, cl), timesteps(shape[0])
            t_prev = (t - 20).clamp(min=-1)
            out = ddim_step(sched, o, x, t, t_prev, n, objective="pred_noise", eta=0.5, backend=backend)
            assert out[0].stride() == out[1].stride() == x.stride()
            ref = reference.ddim_step(sched, o.double(), x.double(), t, t_prev, n.double(), "pred_noise", 0.5)
            native = in_low_precision(reference.ddim_step, sched, o, x, t, t_prev, n, "pred_noise", 0.5)
            check_step(out[:2], ref, dtype, native)


def check_ddim_step_objectives_eta_limits(sched, objective, backend, device):
    with torch.device(device):
        for eta, clip, threshold, rederive in itertools.product((0.0, 1.0), (True, False), (None, (0.9, 1.5)),
                                                                (True, False)):
            x, o, n, t = data((3, 2, 5, 7), scale=2), data((3, 2, 5, 7)), data((3, 2, 5, 7)), timesteps(3)
            t_prev = torch.tensor([-1, 0, 949])
            out = ddim_step(sched, o, x, t, t_prev, n, objective=objective, eta=eta, clip_denoised=clip,
                            threshold=threshold, rederive_noise=rederive, backend=backend)
            ref = reference.ddim_step(sched, o.double(), x.double(), t, t_prev, n.double(), objective, eta, clip,
                                      threshold, rederive)
            check_step(out[:2], ref, torch.float32)


def check_ddim_drawn_noise_and_final_alpha(sched, backend, device):
    with torch.device(device):
        x, o, t, seed = data((2, 3, 4, 4)), data((2, 3, 4, 4)), torch.tensor([10, 500]), torch.tensor([77])
        t_prev = torch.tensor([-1, 480])
        out = ddim_step(sched, o, x, t, t_prev, seed=seed, eta=0.8, final_alpha_cumprod=0.9999, write_noise=True,
                        backend=backend)
        assert close_to_stream(out[2], philox_noise_like(x, seed, 0))
        ref = reference.ddim_step(sched, o.double(), x.double(), t, t_prev, out[2].double(), eta=0.8,
                                  final_alpha_cumprod=0.9999)
        check_step(out[:2], ref, torch.float32)
        # η = 0: deterministic, no noise drawn or written
        det = ddim_step(sched, o, x, t, t_prev, eta=0.0, write_noise=True, backend=backend)
        assert det[2].numel() == 0
