"""The Triton kernels (kernels/), run on CPU tensors by the Triton interpreter, against the float64 reference.

Every op is called through its Triton twin op (fastddpm::<op>_triton) by forcing backend='triton'; the checks
tests/test_cpu_kernels.py runs too are in tests/kernel_grid.py. The last test checks that each kernel was really
launched in this module. On a GPU machine (no interpreter: tests/conftest.py) the same checks run compiled, on
CUDA tensors; FASTDDPM_TEST_DEVICE=cpu|cuda chooses.
"""
import collections
import math
import os

import pytest
import torch

from fastddpm.kernels import loss as loss_kernels
from fastddpm.kernels import q_sample as q_sample_kernels
from fastddpm.kernels import reverse_step as reverse_kernels
from fastddpm.ops.diffusion_loss import diffusion_loss
from fastddpm.ops.q_sample import q_sample
from fastddpm.ops.reverse_step import ddim_step, p_sample_step
from fastddpm.schedules import NoiseSchedule, get_beta_schedule

from . import kernel_grid as grid
from .kernel_grid import OBJECTIVES, T, data, timesteps

DEVICE = os.environ.get("FASTDDPM_TEST_DEVICE") or (
    "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")
BACKEND = "triton"
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


# ----------------------------------------------------------------------------- q_sample (checks: kernel_grid)
@grid.on_grid
def test_q_sample_given_noise(sched, shape, dtype):
    grid.check_q_sample_given_noise(sched, shape, dtype, BACKEND, DEVICE)


@grid.on_grid
def test_q_sample_drawn_noise(sched, shape, dtype):
    grid.check_q_sample_drawn_noise(sched, shape, dtype, BACKEND, DEVICE)


def test_q_sample_odd_layout_is_made_dense(sched):
    grid.check_odd_layout_is_made_dense(sched, BACKEND, DEVICE)


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


# ----------------------------------------------------------------------------- reverse steps
@grid.on_grid
def test_p_sample_step_shapes_dtypes_layouts(sched, shape, dtype):
    grid.check_p_sample_step_shapes_dtypes_layouts(sched, shape, dtype, BACKEND, DEVICE)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_p_sample_step_objectives_variances_limits(sched, objective, variance):
    grid.check_p_sample_step_objectives_variances_limits(sched, objective, variance, BACKEND, DEVICE)


def test_p_sample_step_drawn_noise_and_t0(sched):
    grid.check_p_sample_step_drawn_noise_and_t0(sched, BACKEND, DEVICE)


@grid.on_grid
def test_ddim_step_shapes_dtypes_layouts(sched, shape, dtype):
    grid.check_ddim_step_shapes_dtypes_layouts(sched, shape, dtype, BACKEND, DEVICE)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ddim_step_objectives_eta_limits(sched, objective):
    grid.check_ddim_step_objectives_eta_limits(sched, objective, BACKEND, DEVICE)


def test_ddim_drawn_noise_and_final_alpha(sched):
    grid.check_ddim_drawn_noise_and_final_alpha(sched, BACKEND, DEVICE)


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
                     (ops.diffusion_loss.default, (p, x, t, *tables, None, seed, 0, 2, 5.0, 1, False)),
                     (ops.diffusion_loss.default, (p, None, t, *tables, n, None, 0, 0, None, 0, True)),
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
        return ops.diffusion_loss(net(x_t), x, t, *tables, None, seed, 0, 2, None, 1, True)[0]

    x, t, seed = torch.randn(2, 3, 6, 6), timesteps(2), torch.tensor([5])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, t, seed)
    loss.backward()
    assert torch.allclose(loss, step(x, t, seed)) and net.weight.grad is not None


# ----------------------------------------------------------------------------- bad input
@pytest.mark.isolated
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


def test_launch_constants_are_plain_ints_under_symbolic_shapes():
    """While torch.compile traces with dynamic shapes, sizes are SymInts; the tile sizes, block sizes and warp
    counts the launchers pass as constexprs must still be plain ints (a symbolic constexpr cannot compile),
    equal to what the concrete sizes give, and the grid a function of the sizes."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    from torch._subclasses.fake_tensor import FakeTensorMode

    import triton

    from fastddpm.kernels import common

    for shape in [(3, 2, 5, 5), (64, 3, 32, 32), (2, 1, 1, 1), (5, 4096), (1, 3, 257, 129)]:
        mode = FakeTensorMode(shape_env=ShapeEnv())
        ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * len(shape))
        x = mode.from_tensor(torch.empty(shape), symbolic_context=ctx)
        batch, per_sample = x.shape[0], x.numel() // x.shape[0]
        assert isinstance(per_sample, torch.SymInt)
        concrete = math.prod(shape[1:])
        rows = common.tile_rows(per_sample)
        # (against next_power_of_2 on the concrete sizes, the formula the comparisons replace)
        assert type(rows) is int and rows == min(1024, triton.next_power_of_2(max(1, (concrete + 3) // 4)))
        assert type(common.num_warps(rows)) is int
        block_b = common.pow2_at_least(batch, 1024)
        assert type(block_b) is int and block_b == min(1024, triton.next_power_of_2(shape[0]))
        chunks = common.grid(batch, per_sample, rows)[1]
        assert int(chunks) == common.grid(shape[0], concrete, rows)[1]



def test_every_kernel_was_launched():
    """Runs last in this module: each Triton kernel ran at least once above (through the interpreter)."""
    names = ["q_sample_kernel", "loss_partial_kernel", "loss_finalize_kernel", "loss_backward_kernel",
             "p_sample_kernel", "ddim_kernel"]
    assert all(LAUNCHES[n] > 0 for n in names), dict(LAUNCHES)
