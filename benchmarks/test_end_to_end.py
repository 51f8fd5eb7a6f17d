"""End to end: one training step of a U-Net (loss forward + backward + optimizer step) and the sampling loop,
per provider:

* eager:    Diffusion(backend='reference') with FASTDDPM_BACKEND=reference — the PyTorch reference math
            everywhere, the U-Net's GroupNorm+SiLU included (F.silu(F.group_norm)), ε and z from torch.randn;
* compile:  the same with the network under torch.compile (mode='reduce-overhead' for sampling on a GPU,
            which adds CUDA graphs);
* fastddpm: Diffusion on the fused ops (in-kernel noise, fused loss and reverse step, fused GroupNorm+SiLU)
            and, on a GPU, the CUDA-graph sampling loop.

The CIFAR-10 U-Net (35.7M parameters) runs on CUDA only (a CPU step takes seconds and compiling it minutes);
the small demo U-Net runs everywhere. Sampling is timed over a 10-step DDIM trajectory and reported per step
in extra_info. Around a network of one 1×1 convolution (issue 17's case: 128×3×256×256 on a GPU) the
diffusion ops themselves decide the time of a training step (t, ε, q_sample, the network, the loss and its
backward) and of an ancestral step (Diffusion.p_sample).
"""
import pytest
import torch
from torch import nn

from fastddpm import Diffusion, UNet

from .conftest import DEVICES, PROVIDERS, run

STEPS = 10


def diffusion_for(net_name, device, provider, sampling_timesteps=None, monkeypatch=None):
    if provider in ("eager", "compile") and monkeypatch is not None:
        # The U-Net's modules choose their backend per call ("auto"): the reference providers run the
        # reference GroupNorm+SiLU too, for as long as the test (and so the timing) runs.
        monkeypatch.setenv("FASTDDPM_BACKEND", "reference")
    torch.manual_seed(0)
    if net_name == "cifar10":
        net, size = UNet.cifar10(dropout=0.0), 32
    else:
        net, size = UNet.small(), 8
    net = net.to(device)
    if provider == "compile":
        net = torch.compile(net, mode="reduce-overhead" if device == "cuda" and sampling_timesteps else None)
    backend = "reference" if provider in ("eager", "compile") else "auto"
    return Diffusion(net, image_size=size, timesteps=1000, sampling_timesteps=sampling_timesteps,
                     backend=backend, channels=3 if net_name == "cifar10" else 1).to(device)


# The CIFAR-10 U-Net on CUDA only: a CPU step takes seconds and compiling it minutes.
NETS = [("cpu", "small")] + [(d, n) for d in DEVICES if d == "cuda" for n in ("small", "cifar10")]


@pytest.mark.parametrize(("device", "net_name"), NETS, ids=lambda v: v)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_training_step(benchmark, device, provider, net_name, monkeypatch):
    d = diffusion_for(net_name, device, provider, monkeypatch=monkeypatch)
    batch = 128 if device == "cuda" else 32
    images = torch.rand(batch, d.channels, *d.image_size, device=device)
    opt = torch.optim.Adam(d.model.parameters(), lr=1e-4)

    def step():
        loss = d(images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    loss = run(benchmark, step, device, bytes_moved=0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("batch", [1, 16, 128])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sampling_loop(benchmark, device, provider, batch, monkeypatch):
    d = diffusion_for("small", device, provider, sampling_timesteps=STEPS, monkeypatch=monkeypatch)
    graph = provider == "fastddpm" and device == "cuda"

    def sample():
        return d.sample(batch, progress=False, cuda_graph=graph)

    out = run(benchmark, sample, device, bytes_moved=0)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["per step (s)"] = stats.stats.median / STEPS
    assert out.shape == (batch, 1, 8, 8) and torch.isfinite(out).all()


class PointwiseNet(nn.Module):
    """ε̂ = a 1×1 convolution of x_t plus a learned per-timestep bias: a network that costs next to nothing."""

    def __init__(self, channels=3, timesteps=1000):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.embed = nn.Embedding(timesteps, channels)

    def forward(self, x, t):
        return self.conv(x) + self.embed(t)[:, :, None, None]


POINTWISE_SHAPE = {"cpu": (16, 3, 32, 32), "cuda": (128, 3, 256, 256)}


def pointwise_diffusion(device, provider, monkeypatch):
    torch.manual_seed(0)
    if provider in ("eager", "compile"):
        monkeypatch.setenv("FASTDDPM_BACKEND", "reference")
    net = PointwiseNet().to(device)
    if provider == "compile":
        net = torch.compile(net)
    shape = POINTWISE_SHAPE[device]
    backend = "reference" if provider in ("eager", "compile") else "auto"
    return Diffusion(net, image_size=shape[2:], timesteps=1000, backend=backend, channels=shape[1]).to(device), shape


@pytest.mark.parametrize("provider", PROVIDERS)
def test_training_step_pointwise_net(benchmark, device, provider, monkeypatch):
    d, shape = pointwise_diffusion(device, provider, monkeypatch)
    images = torch.rand(shape, device=device)

    def step():
        loss = d(images)
        loss.backward()
        return loss

    loss = run(benchmark, step, device, bytes_moved=0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_p_sample_pointwise_net(benchmark, device, provider, monkeypatch):
    d, shape = pointwise_diffusion(device, provider, monkeypatch)
    x = torch.randn(shape, device=device)

    def step():
        with torch.no_grad():
            return d.p_sample(x, 500)[0]

    out = run(benchmark, step, device, bytes_moved=0)
    assert out.shape == x.shape and torch.isfinite(out).all()
