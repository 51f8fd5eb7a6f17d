"""The Triton ops' eager path (fastddpm.ops.runs_eagerly): in eager mode with plain tensors the entry points run
the ops' implementations directly, with the same results as the registered ops; anything that must see the op
(a dispatch mode, a tensor subclass, a gradient to x_start) still goes through it."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastddpm.ops.diffusion_loss import diffusion_loss
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


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_eager_loss_and_gradient_equal_the_registered_op(data, objective, reduction):
    sched, x, noise, t, seed = data
    code = {"pred_noise": 0, "pred_x0": 1, "pred_v": 2}[objective]
    pred = torch.randn_like(x, requires_grad=True)
    loss = diffusion_loss(sched, pred, x, t, seed=seed, objective=objective, min_snr_gamma=5.0,
                          reduction=reduction, backend="triton")
    want = torch.ops.fastddpm.diffusion_loss_triton(pred, x, t, sched.sqrt_alphas_cumprod,
                                                    sched.sqrt_one_minus_alphas_cumprod, None,
                                                    None if code == 1 else seed, 0, code, 5.0,
                                                    1 if reduction == "mean" else 0)
    assert torch.equal(loss, want) and loss.requires_grad
    g = torch.rand_like(loss)
    assert torch.equal(torch.autograd.grad(loss, pred, g)[0], torch.autograd.grad(want, pred, g)[0])


def test_what_must_see_the_op_goes_through_it(data):
    sched, x, noise, t, seed = data
    with OpLog() as log:  # a dispatch mode sees the registered op, not its kernels' inputs alone
        diffusion_loss(sched, torch.randn_like(x), x, t, seed=seed, backend="triton")
    assert any("diffusion_loss_triton" in op for op in log.ops)
    # a gradient to x_start: the registered autograd (the eager loss only differentiates model_output)
    pred = torch.randn_like(x)
    grads = []
    for backend in ("triton", "reference"):
        x0 = x.clone().requires_grad_(True)
        loss = diffusion_loss(sched, pred, x0, t, noise, objective="pred_v", backend=backend)
        grads.append(torch.autograd.grad(loss, x0)[0])
    assert grads[0].abs().sum() > 0
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() <= 1e-4
