"""The fused ops with their noise drawn in-kernel, against the same math written as plain PyTorch (eager, and
torch.compile of it) with ε from torch.randn:

* noise + q_sample: x_t = √ᾱ x_0 + √(1−ᾱ) ε with ε drawn — reads x_0, writes x_t (ε in registers only);
* loss forward + backward with ε regenerated (ε objective): forward reads pred, backward reads pred and writes
  ∂L/∂pred;
* noise + q_sample + loss forward + backward: the part of a training step around the network, ε passed from
  q_sample to the loss as Diffusion passes it (fastddpm.ops.diffusion_loss.noised: regenerated from its
  Philox key by the Triton kernels, written once and read back by the C++ CPU kernels);
* the ancestral reverse step with z drawn: reads the model output and x_t, writes x_{t−1}.

Bytes moved count what the algorithm must move (the fused minimum), so GB/s compares providers on one scale.
"""
import pytest
import torch

from fastddpm import reference
from fastddpm.ops import new_seed
from fastddpm.ops.diffusion_loss import diffusion_loss, noised
from fastddpm.ops.q_sample import q_sample
from fastddpm.ops.reverse_step import p_sample_step
from fastddpm.schedules import NoiseSchedule, get_beta_schedule

from .conftest import CIFAR, DEVICES, PROVIDERS, compiled, elements, run

# Per device: the streaming-op size; on a GPU also the CIFAR-10 training batch (the per-call host cost).
SHAPES = [(device, shape) for device in DEVICES for shape in ((elements(device), CIFAR) if device == "cuda"
                                                               else (elements(device),))]


@pytest.fixture(params=SHAPES, ids=lambda v: f"{v[0]}-{'x'.join(map(str, v[1]))}")
def device_shape(request):
    return request.param


def setup(device_shape):
    device, shape = device_shape
    sched = NoiseSchedule(get_beta_schedule("linear", 1000)).to(device)
    x0 = torch.randn(shape, device=device)
    t = torch.randint(0, 1000, (shape[0],), device=device)
    return sched, x0, t


def pick(provider, eager_fn, fused_fn, device):
    if provider == "eager":
        return eager_fn
    if provider == "compile":
        return compiled(eager_fn, device)
    return fused_fn


@pytest.mark.parametrize("provider", PROVIDERS)
def test_noise_and_q_sample(benchmark, device_shape, provider):
    device = device_shape[0]
    sched, x0, t = setup(device_shape)

    def eager(x0, t):
        return reference.q_sample(sched, x0, t, torch.randn_like(x0))

    def fused(x0, t):
        return q_sample(sched, x0, t, seed=new_seed(device), check=False)[0]

    fn = pick(provider, eager, fused, device)
    out = run(benchmark, lambda: fn(x0, t), device, bytes_moved=2 * x0.numel() * 4)
    assert out.shape == x0.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_loss_forward_backward(benchmark, device_shape, provider):
    device = device_shape[0]
    sched, x0, t = setup(device_shape)
    pred = torch.randn_like(x0).requires_grad_(True)
    seed = new_seed(device)

    def eager(pred, x0, t):
        loss = reference.diffusion_loss(sched, pred, x0, t, torch.randn_like(x0))
        return torch.autograd.grad(loss, pred)[0]

    def fused(pred, x0, t):
        loss = diffusion_loss(sched, pred, x0, t, seed=seed, check=False)
        return torch.autograd.grad(loss, pred)[0]

    fn = pick(provider, eager, fused, device)
    grad = run(benchmark, lambda: fn(pred, x0, t), device, bytes_moved=3 * x0.numel() * 4)
    assert grad.shape == x0.shape and torch.isfinite(grad).all()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_noise_q_sample_and_loss_forward_backward(benchmark, device_shape, provider):
    device = device_shape[0]
    sched, x0, t = setup(device_shape)
    pred = torch.randn_like(x0).requires_grad_(True)  # stands in for the network's output

    def eager(pred, x0, t):
        noise = torch.randn_like(x0)
        x_t = reference.q_sample(sched, x0, t, noise)
        loss = reference.diffusion_loss(sched, pred, x0, t, noise)
        return x_t, torch.autograd.grad(loss, pred)[0]

    def fused(pred, x0, t):
        x_t, noise_kwargs = noised(sched, x0, t, check=False)
        loss = diffusion_loss(sched, pred, x0, t, **noise_kwargs, check=False)
        return x_t, torch.autograd.grad(loss, pred)[0]

    fn = pick(provider, eager, fused, device)
    x_t, grad = run(benchmark, lambda: fn(pred, x0, t), device, bytes_moved=5 * x0.numel() * 4)
    assert torch.isfinite(x_t).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("provider", ["fastddpm"])
def test_noise_q_sample_and_loss_forward_backward_eps_stored(benchmark, device_shape, provider):
    """The same with ε written by q_sample and read by the loss forward and backward: the other choice of
    fastddpm.ops.diffusion_loss.noised (one draw and three more passes over ε, against three draws). Beside
    the row above it says which one a device should take; GB/s counts the same fused minimum."""
    device = device_shape[0]
    sched, x0, t = setup(device_shape)
    pred = torch.randn_like(x0).requires_grad_(True)

    def fused(pred, x0, t):
        x_t, eps = q_sample(sched, x0, t, seed=new_seed(device), write_noise=True, check=False)
        loss = diffusion_loss(sched, pred, x0, t, eps, check=False)
        return x_t, torch.autograd.grad(loss, pred)[0]

    x_t, grad = run(benchmark, lambda: fused(pred, x0, t), device, bytes_moved=5 * x0.numel() * 4)
    assert torch.isfinite(x_t).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_reverse_step(benchmark, device_shape, provider):
    device = device_shape[0]
    sched, x, t = setup(device_shape)
    out = torch.randn_like(x)

    def eager(out, x, t):
        return reference.p_sample_step(sched, out, x, t, torch.randn_like(x))[0]

    def fused(out, x, t):
        return p_sample_step(sched, out, x, t, seed=new_seed(device), write_x0=False, check=False)[0]

    fn = pick(provider, eager, fused, device)
    x_prev = run(benchmark, lambda: fn(out, x, t), device, bytes_moved=3 * x.numel() * 4)
    assert x_prev.shape == x.shape and torch.isfinite(x_prev).all()
