"""The Triton ops' eager path (fastddpm.ops.runs_eagerly): in eager mode with plain tensors the entry points run
the ops' implementations directly, with the same results as the registered ops; anything that must see the op
(a dispatch mode, a tensor subclass, a gradient to x_start) still goes through it."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastddpm.ops.q_sample import q_sample
from fastddpm.ops.reverse_step import ddim_step, p_sample_step
from fastddpm.schedules import NoiseSchedule, get_beta_schedule

from .conftest import needs_triton_interpreter

pytestmark = needs_triton_interpreter


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def data():
    torch.manual_seed(0)
    sched = NoiseSchedule(get_beta_schedule("cosine", 50))
    x = torch.randn(3, 2, 5, 7)
    return sched, x, torch.randn_like(x), torch.tensor([0, 17, 49]), torch.tensor([11])


def test_eager_calls_equal_the_registered_ops(data):
    sched, x, noise, t, seed = data
    tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    ops = torch.ops.fastddpm
    assert torch.equal(q_sample(sched, x, t, noise, backend="triton"), ops.q_sample_triton(x, t, *tables, noise))
    got = q_sample(sched, x, t, seed=seed, write_noise=True, backend="triton")
    for a, b in zip(got, ops.q_sample_philox_triton(x, t, *tables, seed, 0, True)):
        assert torch.equal(a, b)
    table = sched.reverse_table()
    got = p_sample_step(sched, noise, x, t, seed=seed, write_noise=True, backend="triton")
    for a, b in zip(got, ops.p_sample_step_triton(noise, x, t, table, None, seed, 0, 0, 1.0, None, True, True)):
        assert torch.equal(a, b)
    t_prev = (t - 5).clamp_min(-1)
    got = ddim_step(sched, noise, x, t, t_prev, backend="triton")
    want = ops.ddim_step_triton(noise, x, t, t_prev, sched.reverse_table("fixed_small"), sched.alphas_cumprod, None,
                                None, 0, 0, 0.0, 1.0, 1.0, None, True, True, False)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_what_must_see_the_op_goes_through_it(data):
    sched, x, noise, t, seed = data
    with OpLog() as log:  # a dispatch mode sees the registered op, not its kernels' inputs alone
        q_sample(sched, x, t, noise, backend="triton")
    assert any("q_sample_triton" in op for op in log.ops)
