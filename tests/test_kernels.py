"""The Triton kernels (kernels/), run on CPU tensors by the Triton interpreter, against the float64 reference.

Every op is called through its Triton twin op (fastddpm::<op>_triton) by forcing backend='triton'. The last
test checks that each kernel was really launched in this module. On a GPU machine tools/device_check.sh runs
this same file compiled on CUDA tensors: FASTDDPM_TEST_DEVICE=cuda TRITON_INTERPRET=0.
"""
import collections
import itertools
import os

import pytest
import torch

from fastddpm import reference
from fastddpm.kernels import loss as loss_kernels
from fastddpm.kernels import q_sample as q_sample_kernels
from fastddpm.kernels import reverse_step as reverse_kernels
from fastddpm.ops.diffusion_loss import diffusion_loss
from fastddpm.ops.q_sample import philox_noise_like, q_sample
from fastddpm.ops.reverse_step import ddim_step, p_sample_step
from fastddpm.schedules import NoiseSchedule, get_beta_schedule

from .conftest import rel_err
from .kernel_grid import (DTYPES, IDS, OBJECTIVES, SHAPES, T, check_step, data, in_low_precision, layouts, loss_case,
                          timesteps, tolerance)

DEVICE = os.environ.get("FASTDDPM_TEST_DEVICE", "cpu")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1", allow_module_level=True)
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("FASTDDPM_TEST_DEVICE=cuda without a GPU", allow_module_level=True)
LAUNCHES = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def count_launches():
    """Count interpreter launches per kernel (the interpreter calls kernel.run for kernel[grid](...))."""
    kernels = [q_sample_kernels.q_sample_kernel, loss_kernels.loss_partial_kernel, loss_kernels.loss_finalize_kernel,
               loss_kernels.loss_backward_kernel, reverse_kernels.p_sample_kernel, reverse_kernels.ddim_kernel]
    originals = {}
    for k in kernels:
        originals[k] = k.run

        def run(*args, _k=k, **kwargs):
            LAUNCHES[_k.fn.__name__] += 1
            return originals[_k](*args, **kwargs)
        k.run = run
    yield
    for k, original in originals.items():
        k.run = original


@pytest.fixture(scope="module", autouse=True)
def on_device():
    """Every tensor this module creates lives on DEVICE."""
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


@pytest.fixture(scope="module")
def sched(on_device):
    return NoiseSchedule(get_beta_schedule("linear", T)).to(DEVICE)


# ----------------------------------------------------------------------------- q_sample
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_q_sample_given_noise(sched, shape, dtype):
    for cl in layouts(shape):
        x, n, t = data(shape, dtype, cl), data(shape, dtype, cl), timesteps(shape[0])
        out = q_sample(sched, x, t, n, backend="triton")
        ref = reference.q_sample(sched, x.double(), t, n.double())
        assert out.dtype == dtype and out.shape == x.shape
        assert out.stride() == x.stride()  # the layout is kept
        native = in_low_precision(reference.q_sample, sched, x, t, n)
        assert rel_err(out, ref) <= tolerance(ref, dtype, native=native)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_q_sample_drawn_noise(sched, shape, dtype):
    for cl in layouts(shape):
        x, t, seed = data(shape, dtype, cl), timesteps(shape[0]), torch.randint(0, 2**62, (1,))
        out, eps = q_sample(sched, x, t, seed=seed, offset=17, write_noise=True, backend="triton")
        assert eps.dtype == dtype and eps.stride() == x.stride()
        # the ε written is the reference Philox stream, and x_t is q_sample with it
        expected = philox_noise_like(x, seed, 17)
        # ε itself is only rounded to the dtype: within half a unit in the last place
        ulp = torch.finfo(dtype).eps * expected.abs() / 2 + 1e-6
        assert ((eps.float() - expected).abs() <= ulp).all()
        ref = reference.q_sample(sched, x.double(), t, expected.double())
        native = in_low_precision(reference.q_sample, sched, x, t, expected.to(dtype))
        assert rel_err(out, ref) <= tolerance(ref, dtype, native=native)
        out2, none = q_sample(sched, x, t, seed=seed, offset=17, backend="triton")
        assert none.numel() == 0 and torch.equal(out2, out)  # same (seed, offset) → same noise


def test_q_sample_odd_layout_is_made_dense(sched):
    x = torch.randn(4, 6, 5, 3)[:, ::2]  # not dense
    n, t = torch.randn_like(x), timesteps(4)
    out = q_sample(sched, x, t, n, backend="triton")
    assert rel_err(out, reference.q_sample(sched, x.double(), t, n.double())) < 1e-6


def test_strided_timesteps(sched):
    """t as an expanded (stride 0) or strided view reads the right value for every sample."""
    x, o, n = data((4, 2, 3, 3)), data((4, 2, 3, 3)), data((4, 2, 3, 3))
    for t in (torch.tensor(7).expand(4), torch.arange(8)[::2] * 100):
        ref_t = t.contiguous()
        assert torch.equal(q_sample(sched, x, t, n, backend="triton"), q_sample(sched, x, ref_t, n, backend="triton"))
        assert torch.equal(p_sample_step(sched, o, x, t, n, backend="triton")[0],
                           p_sample_step(sched, o, x, ref_t, n, backend="triton")[0])
        assert torch.equal(ddim_step(sched, o, x, t, t - 1, n, eta=1.0, backend="triton")[0],
                           ddim_step(sched, o, x, ref_t, ref_t - 1, n, eta=1.0, backend="triton")[0])
        assert torch.equal(diffusion_loss(sched, o, x, t, n, backend="triton"),
                           diffusion_loss(sched, o, x, ref_t, n, backend="triton"))


# ----------------------------------------------------------------------------- noise statistics
def test_noise_statistics_and_streams(sched):
    x, t = torch.zeros(8, 4, 32, 32), torch.zeros(8, dtype=torch.long)
    seed = torch.tensor([123456789])

    def eps(seed, offset):
        return q_sample(sched, x, t, seed=seed, offset=offset, write_noise=True, backend="triton")[1].flatten()

    a = eps(seed, 0)
    n = a.numel()
    assert abs(a.mean().item()) < 4 / n**0.5 and abs(a.var().item() - 1) < 4 * (2 / n) ** 0.5
    assert abs(((a - a.mean()) ** 4).mean().item() / a.var().item() ** 2 - 3) < 0.1  # Gaussian kurtosis
    assert torch.equal(a, eps(seed, 0))
    for b in (eps(seed + 1, 0), eps(seed, 1), eps(seed, n // 4)):
        assert not torch.equal(a, b)
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 4 / n**0.5
    # advancing the offset by one call's counters continues the stream: call 2 = the second half of one call
    # over twice the batch
    half = q_sample(sched, x[:4], t[:4], seed=seed, offset=4 * (x[0].numel() // 4), write_noise=True,
                    backend="triton")[1]
    assert torch.equal(half.flatten(), a[n // 2:])


def test_loss_regenerates_the_noise_q_sample_drew(sched):
    x, t, seed = data((4, 3, 8, 8)), timesteps(4), torch.tensor([42])
    x_t, eps = q_sample(sched, x, t, seed=seed, offset=5, write_noise=True, backend="triton")
    pred = torch.randn_like(x)
    for objective in OBJECTIVES:
        regenerated = diffusion_loss(sched, pred, x, t, seed=seed, offset=5, objective=objective, backend="triton")
        stored = diffusion_loss(sched, pred, x, t, eps, objective=objective, backend="triton")
        assert torch.equal(regenerated, stored)


# ----------------------------------------------------------------------------- loss
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_loss_shapes_dtypes_layouts(sched, shape, dtype):
    for cl in layouts(shape):
        loss_case(sched, shape, dtype, cl, "pred_v", 5.0, "mean", drawn=True, backend="triton")


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_objectives_weights_reductions(sched, objective):
    for gamma, reduction, drawn in itertools.product((None, 5.0), ("mean", "none"), (False, True)):
        loss_case(sched, (3, 2, 5, 7), torch.float32, False, objective, gamma, reduction, drawn, "triton")


def test_loss_gradients_reach_x_start_and_noise(sched):
    for objective in OBJECTIVES:
        x, n, p = (torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
        t = timesteps(3)
        out = diffusion_loss(sched, p, x, t, n, objective=objective, reduction="none", backend="triton")
        ref = reference.diffusion_loss(sched, p, x, t, n, objective, None, "none")
        g = torch.rand(3, dtype=torch.float64)
        got = torch.autograd.grad(out, (p, x, n), g, allow_unused=True)
        want = torch.autograd.grad(ref, (p, x, n), g, allow_unused=True)
        for a, b in zip(got, want):
            assert (a is None) == (b is None or b.abs().max() == 0)
            if a is not None:
                assert rel_err(a, b) < 1e-10


# ----------------------------------------------------------------------------- reverse steps
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_p_sample_step_shapes_dtypes_layouts(sched, shape, dtype):
    for cl in layouts(shape):
        x, o, n, t = data(shape, dtype, cl, 2), data(shape, dtype, cl), data(shape, dtype, cl), timesteps(shape[0])
        x_prev, x0, _ = p_sample_step(sched, o, x, t, n, objective="pred_v", backend="triton")
        assert x_prev.stride() == x.stride()
        ref = reference.p_sample_step(sched, o.double(), x.double(), t, n.double(), "pred_v")
        native = in_low_precision(reference.p_sample_step, sched, o, x, t, n, "pred_v")
        check_step((x_prev, x0), ref, dtype, native)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_p_sample_step_objectives_variances_limits(sched, objective, variance):
    for clip, threshold in ((True, None), (False, None), (2.5, None), (True, (0.9, 1.5))):
        x, o, n, t = data((4, 3, 5, 6), scale=2), data((4, 3, 5, 6)), data((4, 3, 5, 6)), timesteps(4)
        out = p_sample_step(sched, o, x, t, n, objective=objective, variance=variance, clip_denoised=clip,
                            threshold=threshold, backend="triton")
        ref = reference.p_sample_step(sched, o.double(), x.double(), t, n.double(), objective, variance, clip,
                                      threshold)
        check_step(out[:2], ref, torch.float32)


def test_p_sample_step_drawn_noise_and_t0(sched):
    x, o, t, seed = data((4, 3, 6, 6)), data((4, 3, 6, 6)), timesteps(4), torch.tensor([9])
    x_prev, x0, z = p_sample_step(sched, o, x, t, seed=seed, offset=11, write_noise=True, backend="triton")
    assert rel_err(z, philox_noise_like(x, seed, 11)) < 1e-6
    ref = reference.p_sample_step(sched, o.double(), x.double(), t, z.double())
    check_step((x_prev, x0), ref, torch.float32)
    assert torch.equal(x_prev[0], x0[0] * sched.posterior_mean_coef1[0] + x[0] * sched.posterior_mean_coef2[0]) or \
        rel_err(x_prev[0], ref[0][0]) < 1e-6  # t = 0: no noise


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_ddim_step_shapes_dtypes_layouts(sched, shape, dtype):
    for cl in layouts(shape):
        x, o, n, t = data(shape, dtype, cl, 2), data(shape, dtype, cl), data(shape, dtype, cl), timesteps(shape[0])
        t_prev = (t - 20).clamp(min=-1)
        out = ddim_step(sched, o, x, t, t_prev, n, objective="pred_noise", eta=0.5, backend="triton")
        ref = reference.ddim_step(sched, o.double(), x.double(), t, t_prev, n.double(), "pred_noise", 0.5)
        native = in_low_precision(reference.ddim_step, sched, o, x, t, t_prev, n, "pred_noise", 0.5)
        check_step(out[:2], ref, dtype, native)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ddim_step_objectives_eta_limits(sched, objective):
    for eta, clip, threshold, rederive in itertools.product((0.0, 1.0), (True, False), (None, (0.9, 1.5)),
                                                            (True, False)):
        x, o, n, t = data((3, 2, 5, 7), scale=2), data((3, 2, 5, 7)), data((3, 2, 5, 7)), timesteps(3)
        t_prev = torch.tensor([-1, 0, 949])
        out = ddim_step(sched, o, x, t, t_prev, n, objective=objective, eta=eta, clip_denoised=clip,
                        threshold=threshold, rederive_noise=rederive, backend="triton")
        ref = reference.ddim_step(sched, o.double(), x.double(), t, t_prev, n.double(), objective, eta, clip,
                                  threshold, rederive)
        check_step(out[:2], ref, torch.float32)


def test_ddim_drawn_noise_and_final_alpha(sched):
    x, o, t, seed = data((2, 3, 4, 4)), data((2, 3, 4, 4)), torch.tensor([10, 500]), torch.tensor([77])
    t_prev = torch.tensor([-1, 480])
    out = ddim_step(sched, o, x, t, t_prev, seed=seed, eta=0.8, final_alpha_cumprod=0.9999, write_noise=True,
                    backend="triton")
    assert rel_err(out[2], philox_noise_like(x, seed, 0)) < 1e-6
    ref = reference.ddim_step(sched, o.double(), x.double(), t, t_prev, out[2].double(), eta=0.8,
                              final_alpha_cumprod=0.9999)
    check_step(out[:2], ref, torch.float32)


# ----------------------------------------------------------------------------- poisoned outputs
def test_every_output_element_is_written(sched, monkeypatch):
    """Outputs come from torch.empty_like: make it return NaN-filled tensors, so an unwritten element shows."""
    real = torch.empty_like

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", poisoned)
    x, o, n, t = data((3, 1, 7, 5)), data((3, 1, 7, 5)), data((3, 1, 7, 5)), timesteps(3)
    seed = torch.tensor([1])
    outs = [q_sample(sched, x, t, n, backend="triton"),
            *q_sample(sched, x, t, seed=seed, write_noise=True, backend="triton"),
            *p_sample_step(sched, o, x, t, seed=seed, write_noise=True, backend="triton"),
            *ddim_step(sched, o, x, t, t - 1, seed=seed, eta=1.0, write_noise=True, backend="triton")]
    p = o.clone().requires_grad_(True)
    outs.append(torch.autograd.grad(diffusion_loss(sched, p, x, t, n, backend="triton"), p)[0])
    assert all(torch.isfinite(out).all() for out in outs)


# ----------------------------------------------------------------------------- op registration
def test_opcheck_triton_ops(sched):
    """Schema, autograd registration and fake impls; the AOT-dispatch test needs real kernels under fake
    tensors, which the interpreter cannot run: tools/device_check.sh runs the full opcheck on a GPU."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    x = torch.randn(3, 2, 5, 5)
    p, n, t = torch.randn_like(x, requires_grad=True), torch.randn_like(x), timesteps(3)
    seed, tables = torch.tensor([3]), (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    ops = torch.ops.fastddpm
    cases = [(ops.q_sample_triton.default, (x.requires_grad_(True), t, *tables, n)),
             (ops.q_sample_philox_triton.default, (x, t, *tables, seed, 0, True)),
             (ops.diffusion_loss_triton.default, (p, x.detach(), t, *tables, None, seed, 0, 2, 5.0, 1)),
             (ops.diffusion_loss_triton.default, (p, None, t, *tables, n, None, 0, 0, None, 0)),
             (ops.p_sample_step_triton.default, (n, x.detach(), t, sched.reverse_table(), None, seed, 0, 0, 1.0,
                                                 None, True, True)),
             (ops.ddim_step_triton.default, (n, x.detach(), t, t - 1, sched.reverse_table(), sched.alphas_cumprod,
                                             n, None, 0, 2, 0.5, 1.0, None, None, True, True, False))]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=utils)


def test_opcheck_cpu_registrations(sched):
    """The same schemas on CPU (C++ schema, CPU impl): the full opcheck, AOT dispatch included."""
    x = torch.randn(3, 2, 5, 5)
    p, n, t = torch.randn_like(x, requires_grad=True), torch.randn_like(x), timesteps(3)
    seed, tables = torch.tensor([3]), (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    ops = torch.ops.fastddpm
    for op, args in [(ops.q_sample_philox.default, (x, t, *tables, seed, 0, True)),
                     (ops.diffusion_loss.default, (p, x, t, *tables, None, seed, 0, 2, 5.0, 1)),
                     (ops.diffusion_loss.default, (p, None, t, *tables, n, None, 0, 0, None, 0)),
                     (ops.p_sample_step.default, (n, x, t, sched.reverse_table(), None, seed, 0, 0, 1.0, None,
                                                  True, True)),
                     (ops.ddim_step.default, (n, x, t, t - 1, sched.reverse_table(), sched.alphas_cumprod, n, None,
                                              0, 2, 0.5, 1.0, None, None, True, True, False))]:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_training_step_through_the_ops(sched):
    """A training step (in-kernel noise → network → fused loss → backward) compiles without a graph break
    through the ops' CPU registrations (Triton ops compile only on a GPU: see tools/device_check.sh)."""
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    ops = torch.ops.fastddpm
    tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)

    def step(x, t, seed):
        x_t, _ = ops.q_sample_philox(x, t, *tables, seed, 0, False)
        return ops.diffusion_loss(net(x_t), x, t, *tables, None, seed, 0, 2, None, 1)

    x, t, seed = torch.randn(2, 3, 6, 6), timesteps(2), torch.tensor([5])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, t, seed)
    loss.backward()
    assert torch.allclose(loss, step(x, t, seed)) and net.weight.grad is not None


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors(sched):
    x, n, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0, 5])
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\), got 1000"):
        q_sample(sched, x, torch.tensor([0, 1000]), n, backend="triton")
    with pytest.raises(ValueError, match="got -1"):
        p_sample_step(sched, x, x, torch.tensor([-1, 3]), n, backend="triton")
    with pytest.raises(RuntimeError, match="x_start must be float16, bfloat16, float32 or float64, got torch.int64"):
        q_sample(sched, x.long(), t, n, backend="triton")
    with pytest.raises(RuntimeError, match=r"noise has shape \(2, 3, 4, 5\), expected \(2, 3, 4, 4\)"):
        q_sample(sched, x, t, torch.randn(2, 3, 4, 5), backend="triton")
    with pytest.raises(RuntimeError, match=r"t must be int64 of shape \[2\]"):
        q_sample(sched, x, t.int(), n, backend="triton")
    with pytest.raises(RuntimeError, match=r"x_start has shape \(2, 3, 4, 4\), expected \(2, 3, 4, 3\)"):
        diffusion_loss(sched, x[..., :3], x, t, n, objective="pred_x0", backend="triton")
    with pytest.raises(RuntimeError, match=f"table sqrt_alphas_cumprod is on meta, the data on {DEVICE}"):
        torch.ops.fastddpm.q_sample_triton(x, t, sched.sqrt_alphas_cumprod.to("meta"),
                                           sched.sqrt_one_minus_alphas_cumprod, n)
    with pytest.raises(RuntimeError, match=f"noise is on meta, the data on {DEVICE}"):
        torch.ops.fastddpm.q_sample_triton(x, t, sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod,
                                           n.to("meta"))
    with pytest.raises(RuntimeError, match="give exactly one of noise and seed"):
        diffusion_loss(sched, x, x, t, n, seed=torch.tensor([1]), backend="triton")
    with pytest.raises(RuntimeError, match="the x_0 and v objectives need x_start"):
        diffusion_loss(sched, x, None, t, n, objective="pred_v", backend="triton")
    with pytest.raises(RuntimeError, match=r"table must be \[7, T\]"):
        torch.ops.fastddpm.p_sample_step_triton(x, x, t, sched.betas, n, None, 0, 0, None, None, False, False)
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor"):
        q_sample(sched, x, t, seed=torch.tensor([1.0]), backend="triton")


def test_out_of_range_t_never_reads_outside_the_tables(sched):
    """Without the host check (as in sampling loops) a bad t is clamped in-kernel: finite output, no crash."""
    x, n = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = q_sample(sched, x, torch.tensor([-5, 10**9]), n, backend="triton", check=False)
    assert torch.isfinite(out).all()


def test_every_kernel_was_launched():
    """Runs last in this module: each Triton kernel ran at least once above (through the interpreter)."""
    names = ["q_sample_kernel", "loss_partial_kernel", "loss_finalize_kernel", "loss_backward_kernel",
             "p_sample_kernel", "ddim_kernel"]
    assert all(LAUNCHES[n] > 0 for n in names), dict(LAUNCHES)
