"""What the Triton kernels (kernels/) share beyond one op, with backend='triton': CPU tensors under the Triton
interpreter here, CUDA tensors compiled on a GPU machine (FASTDDPM_TEST_DEVICE=cpu|cuda chooses). Each op's
own tests, over every backend, are tests/ops/test_<op>.py.
"""
import collections
import math
import os

import pytest
import torch

from fastddpm.kernels import loss as loss_kernels
from fastddpm.kernels import q_sample as q_sample_kernels
from fastddpm.ops.diffusion_loss import diffusion_loss
from fastddpm.schedules import NoiseSchedule, get_beta_schedule

from .kernel_grid import T, data, timesteps

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
    kernels = [q_sample_kernels.q_sample_kernel, loss_kernels.loss_partial_kernel,
               loss_kernels.loss_finalize_kernel, loss_kernels.loss_backward_kernel]
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


def test_strided_timesteps(sched):
    """t as an expanded (stride 0) or strided view reads the right value for every sample."""
    x, o, n = data((4, 2, 3, 3)), data((4, 2, 3, 3)), data((4, 2, 3, 3))
    for t in (torch.tensor(7).expand(4), torch.arange(8)[::2] * 100):
        ref_t = t.contiguous()
        assert torch.equal(diffusion_loss(sched, o, x, t, n, backend="triton"),
                           diffusion_loss(sched, o, x, ref_t, n, backend="triton"))




# ----------------------------------------------------------------------------- poisoned outputs
def test_every_output_element_is_written(sched, poisoned):
    x, o, n, t = data((3, 1, 7, 5)), data((3, 1, 7, 5)), data((3, 1, 7, 5)), timesteps(3)
    p = o.clone().requires_grad_(True)
    outs = [torch.autograd.grad(diffusion_loss(sched, p, x, t, n, backend="triton"), p)[0]]
    assert all(torch.isfinite(out).all() for out in outs)


# ----------------------------------------------------------------------------- op registration
def test_opcheck_cpu_registrations(sched):
    """The same schemas on CPU (C++ schema, CPU impl): the full opcheck, AOT dispatch included."""
    x = torch.randn(3, 2, 5, 5)
    p, n, t = torch.randn_like(x, requires_grad=True), torch.randn_like(x), timesteps(3)
    seed, tables = torch.tensor([3]), (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    ops = torch.ops.fastddpm
    for op, args in [(ops.diffusion_loss.default, (p, x, t, *tables, None, seed, 0, 2, 5.0, 1, False)),
                     (ops.diffusion_loss.default, (p, None, t, *tables, n, None, 0, 0, None, 0, True))]:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_training_step_through_the_ops(sched):
    """A training step (in-kernel noise → network → fused loss → backward) compiles without a graph break
    through the ops' CPU registrations (Triton ops compile only on a GPU: see tools/device_check.sh)."""
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    ops = torch.ops.fastddpm
    tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)

    def step(x, t, seed):
        x_t, _ = ops.q_sample(x, t, *tables, None, seed, 0, False)
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
    with pytest.raises(RuntimeError, match=r"x_start has shape \(2, 3, 4, 4\), expected \(2, 3, 4, 3\)"):
        diffusion_loss(sched, x[..., :3], x, t, n, objective="pred_x0", backend="triton")
    with pytest.raises(RuntimeError, match="give exactly one of noise and seed"):
        diffusion_loss(sched, x, x, t, n, seed=torch.tensor([1]), backend="triton")
    with pytest.raises(RuntimeError, match="the x_0 and v objectives need x_start"):
        diffusion_loss(sched, x, None, t, n, objective="pred_v", backend="triton")


def test_launch_constants_are_plain_ints_under_symbolic_shapes():
    """While torch.compile traces with dynamic shapes, sizes are SymInts; the tile sizes, block sizes and warp
    counts the launchers pass as constexprs must still be plain ints (a symbolic constexpr cannot compile),
    equal to what the concrete sizes give, and the grid a function of the sizes."""
    import triton
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

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



def test_the_triton_backend_launches_the_kernels(sched):
    """backend='triton' runs the Triton kernels, not a fallback: q_sample (ε given and drawn) and the loss's
    forward and backward each launch theirs (the steps' check: tests/ops/test_p_sample_step.py)."""
    from fastddpm.ops.q_sample import q_sample

    LAUNCHES.clear()
    x, n, t = data((3, 2, 5, 5)), data((3, 2, 5, 5)), timesteps(3)
    q_sample(sched, x, t, n, backend="triton")
    q_sample(sched, x, t, seed=torch.tensor([5]), backend="triton")
    p = data((3, 2, 5, 5)).requires_grad_(True)
    diffusion_loss(sched, p, x, t, n, objective="pred_v", backend="triton").backward()
    assert LAUNCHES["q_sample_kernel"] == 2, dict(LAUNCHES)
    names = ["loss_partial_kernel", "loss_finalize_kernel", "loss_backward_kernel"]
    assert all(LAUNCHES[n] > 0 for n in names), dict(LAUNCHES)
