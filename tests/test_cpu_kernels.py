"""The fused C++ CPU kernels (csrc/cpu/) against the float64 reference, on the grids of tests/test_kernels.py.

Every op is called through its C++ op (fastddpm::<op>) by forcing backend='cpp'; the checks
tests/test_kernels.py runs too are in tests/kernel_grid.py. The in-kernel noise is checked against
fastddpm.reference.philox_normal and against the Triton kernel's (through the interpreter) for the same (seed,
offset); outputs must not depend on the thread count; unwritten output elements show as NaN (PyTorch fills
fresh tensors with NaN under torch.use_deterministic_algorithms).
"""

import pytest
import torch

from fastddpm import _extension
from fastddpm.ops.diffusion_loss import diffusion_loss, noised
from fastddpm.schedules import NoiseSchedule, get_beta_schedule

from .conftest import needs_triton_interpreter, rel_err
from .kernel_grid import OBJECTIVES, T, data, timesteps

if (not _extension.cpu_built()
        or not torch._C._dispatch_has_kernel_for_dispatch_key("fastddpm::ddim_step", "CPU")):
    pytest.skip("fastddpm._C without the C++ CPU kernels", allow_module_level=True)

ops = torch.ops.fastddpm
BACKEND, DEVICE = "cpp", "cpu"


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule(get_beta_schedule("linear", T))


# ----------------------------------------------------------------------------- noise (checks: kernel_grid)
@needs_triton_interpreter
def test_noise_matches_the_triton_kernel(sched):
    """The same (seed, offset) gives the same ε in the C++ kernel and in the Triton kernel (interpreter)."""
    x, t = data((3, 2, 9, 5)), timesteps(3)
    for seed, offset in ((torch.tensor([42]), 0), (torch.tensor([2**61 + 3]), 2**32 - 10)):
        # the loss regenerates the ε q_sample drew, in both
        pred = torch.randn_like(x)
        for objective in OBJECTIVES:
            a = diffusion_loss(sched, pred, x, t, seed=seed, offset=offset, objective=objective,
                               backend="cpp")
            b = diffusion_loss(sched, pred, x, t, seed=seed, offset=offset, objective=objective,
                               backend="triton")
            assert rel_err(a, b) <= 1e-5




def test_tables_are_read_in_place_in_float32_float64_or_strided(sched):
    """The per-sample table lookups read float32 and float64 tables where they lie: float64 tables that hold
    the float32 values give the same bits (the steps' 2-D tables: tests/ops/test_p_sample_step.py and
    test_ddim_step.py)."""
    x, o, n, t = data((3, 2, 5, 5)), data((3, 2, 5, 5)), data((3, 2, 5, 5)), timesteps(3)
    tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    tables64 = tuple(tab.double() for tab in tables)
    for objective in (0, 1, 2):
        assert torch.equal(ops.diffusion_loss(o, x, t, *tables, n, None, 0, objective, 5.0, 0, False)[0],
                           ops.diffusion_loss(o, x, t, *tables64, n, None, 0, objective, 5.0, 0, False)[0])


# ----------------------------------------------------------------------------- threads, poison, opcheck
def _every_op(sched, x, t, seed):
    o = torch.sin(x * 3)
    n = torch.cos(x * 5)
    tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    table = sched.reverse_table()
    g = torch.tensor(0.7)
    return [*(ops.diffusion_loss(o, x, t, *tables, None, seed, 5, obj, gamma, red, False)[0]
              for obj, gamma, red in ((0, None, 1), (1, 5.0, 0), (2, 5.0, 1))),
            ops.diffusion_loss(o, x, t, *tables, n, None, 0, 2, None, 1, False)[0],
            ops.diffusion_loss_backward(g, o, x, t, *tables, None, seed, 5, 2, 5.0, 1),
            *ops.diffusion_loss(o, x, t, *tables, None, seed, 5, 2, 5.0, 0, True),
            *ops.p_sample_step(o, x, t, table, None, seed, 5, 0, 1.0, None, True, True),
            *ops.ddim_step(o, x, t, (t - 7).clamp(min=-1), table, sched.alphas_cumprod, None, seed, 5, 2, 0.6,
                           1.0, 1.0, None, True, True, True)]


def test_results_do_not_depend_on_the_thread_count(sched):
    x, t, seed = data((6, 3, 61, 67)), timesteps(6), torch.tensor([31337])  # 12261 elements per sample
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _every_op(sched, x, t, seed)
        torch.set_num_threads(2)
        two = _every_op(sched, x, t, seed)
    finally:
        torch.set_num_threads(threads)
    assert len(one) == len(two) == 13
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_every_output_element_is_written(sched, poisoned):
    outs = []
    for shape, cl in (((3, 1, 7, 5), False), ((2, 3, 5, 5), True), ((5, 2, 9), False)):
        x, t, seed = data(shape, channels_last=cl), timesteps(shape[0]), torch.tensor([1])
        outs += _every_op(sched, x, t, seed)
    assert all(torch.isfinite(out).all() for out in outs)


def test_entry_points_compile_without_a_graph_break(sched):
    """torch.compile(fullgraph=True) traces the entry points (noised → network → loss) without a graph break
    (call_op's no-grad path against the autograd path: tests/ops/test_q_sample.py)."""
    x, t = data((2, 3, 6, 6)), timesteps(2)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)

    def step(x, t):
        x_t, noise_kwargs = noised(sched, x, t, backend="cpp", check=False)
        return diffusion_loss(sched, net(x_t), x, t, **noise_kwargs, objective="pred_v", backend="cpp",
                              check=False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    loss = compiled(x, t)
    loss.backward()  # traced: the loss's backward scales the gradient its forward kept by the fake incoming 1
    compiled_grad, net.weight.grad = net.weight.grad, None
    torch.manual_seed(3)
    eager_loss = step(x, t)
    eager_loss.backward()
    assert torch.equal(loss, eager_loss) and rel_err(compiled_grad, net.weight.grad) <= 1e-6


def test_diffusion_trains_and_samples_with_in_kernel_noise_on_cpp():
    """Diffusion on the cpp backend takes the fused path (ε drawn in q_sample, regenerated in the loss) and
    its sampling loops draw z in-kernel; both reproducible under torch.manual_seed."""
    from fastddpm import Diffusion
    from fastddpm.ops import draws_noise_in_kernel

    from .conftest import TinyNet

    d = Diffusion(TinyNet(timesteps=20), image_size=6, timesteps=20, beta_schedule="cosine", backend="cpp")
    assert draws_noise_in_kernel("p_sample_step", d.device, d.backend)
    assert draws_noise_in_kernel("ddim_step", d.device, d.backend)
    x0 = torch.rand(2, 3, 6, 6) * 2 - 1
    torch.manual_seed(1)
    a = d.p_losses(x0, torch.tensor([3, 17]))
    torch.manual_seed(1)
    b = d.p_losses(x0, torch.tensor([3, 17]))
    assert torch.equal(a, b) and torch.isfinite(a)
    a.backward()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.isolated
def test_bad_input_raises_clear_errors(sched):
    x, n, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0, 5])
    tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    seed = torch.tensor([1])
    cases = [
        (r"got t\[0\] = -1",
         lambda: ops.diffusion_loss(x, x, torch.tensor([-1, 3]), *tables, n, None, 0, 0, None, 1, False)),
        (r"x_start has shape \[2, 3, 4, 3\], expected \[2, 3, 4, 4\]",
         lambda: ops.diffusion_loss(x, x[..., :3], t, *tables, None, None, 0, 1, None, 1, False)),
        ("seed is on meta, the data on cpu",  # (meta tensors meet the fake impl)
         lambda: ops.diffusion_loss(x, x, t, *tables, None, seed.to("meta"), 0, 0, None, 1, False)),
        ("give exactly one of noise and seed",
         lambda: ops.diffusion_loss(x, x, t, *tables, n, seed, 0, 0, None, 1, False)),
        ("the x_0 and v objectives need x_start",
         lambda: ops.diffusion_loss(x, None, t, *tables, n, None, 0, 2, None, 1, False)),
        ("objective must be 0", lambda: ops.diffusion_loss(x, x, t, *tables, n, None, 0, 3, None, 1, False)),
        ("reduction must be 0", lambda: ops.diffusion_loss(x, x, t, *tables, n, None, 0, 0, None, 2, False)),
        (r"grad must have the loss's shape",
         lambda: ops.diffusion_loss_backward(torch.ones(3), x, x, t, *tables, n, None, 0, 0, None, 0)),
    ]
    for message, call in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_portable_kernels_for_cpus_without_avx2():
    """The build chosen on CPUs without AVX2/FMA (forced by FASTDDPM_CPU_KERNELS=portable, read once per
    process): the same stream within float rounding, the same results, thread-count independent."""
    import subprocess
    import sys

    code = """
import torch
from fastddpm import reference
from fastddpm.ops.q_sample import philox_noise_like
from fastddpm.schedules import NoiseSchedule, get_beta_schedule
sched = NoiseSchedule(get_beta_schedule("linear", 1000))
tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
x, t, seed = torch.randn(6, 3, 61, 67), torch.tensor([0, 1, 999, 5, 500, 77]), torch.tensor([2**40 + 9])
outs = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    x_t, eps = torch.ops.fastddpm.q_sample(x, t, *tables, None, seed, 2**32 - 100, True)
    loss = torch.ops.fastddpm.diffusion_loss(x * 0.5, x, t, *tables, None, seed, 2**32 - 100, 2, 5.0, 0,
                                             False)[0]
    step = torch.ops.fastddpm.ddim_step(x * 0.5, x, t, t - 1, sched.reverse_table(), sched.alphas_cumprod,
                                        None, seed, 3, 0, 0.5, 1.0, 1.0, None, True, True, True)
    outs.append([x_t, eps, loss, *step])
assert all(torch.equal(a, b) for a, b in zip(*outs))
expected = philox_noise_like(x, seed, 2**32 - 100)
assert (eps - expected).abs().max() <= 1e-6 + 6e-8 * expected.abs().max()
ref = reference.q_sample(sched, x.double(), t, expected.double())
assert ((x_t - ref).norm() / ref.norm()) < 1e-6
print("portable ok")
"""
    env = {**__import__("os").environ, "FASTDDPM_CPU_KERNELS": "portable"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "portable ok" in result.stdout, result.stderr[-2000:]
