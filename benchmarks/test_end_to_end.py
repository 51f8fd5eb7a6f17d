"""End to end: one training step of a U-Net and the DDIM sampling loop, per provider (issue 18's table):

* eager:             Diffusion(backend='reference') with FASTDDPM_BACKEND=reference — the PyTorch reference
                     math everywhere, the U-Net's GroupNorm+SiLU included (F.silu(F.group_norm)), ε and z from
                     torch.randn;
* compile:           the same with the network under torch.compile (mode='reduce-overhead' for sampling on a
                     GPU, which adds CUDA graphs);
* fastddpm:          Diffusion on the fused ops (in-kernel noise, fused loss and reverse step, fused
                     GroupNorm+SiLU), eager;
* fast-path:         training: Trainer(fast_path=True), the whole step (loss, backward, clipping, fused Adam,
                     EMA) as one function of static buffers, captured in a CUDA graph on a GPU (eager on the
                     CPU); sampling: Diffusion.sample(cuda_graph=True) (GPU only);
* diffusers:         diffusers' UNet2DModel of the same config and weights (UNet.to_diffusers) in the
                     reference Diffusion, eager; skipped when diffusers is not installed;
* diffusers-compile: the same under torch.compile.

The training step of the eager, compile, fastddpm and diffusers providers is the loss, backward and an Adam
step; the fast path's also clips the gradient and updates the EMA, as `fastddpm train` does: its time bounds
the like-for-like one from above.

The paper's CIFAR-10 U-Net (35.7M parameters, batch 128, fp32 and bf16 autocast; DDIM at batch 1 and
64) runs on CUDA only (a CPU step takes seconds); the compile providers run on CUDA only (compiling the
U-Net's training step on the CPU takes minutes), compiled diffusers on the CIFAR-10 U-Net only, and on the
CIFAR-10 U-Net the compile providers at fp32 (and batch 1 for sampling) only, to keep the device run within
its time. The small demo U-Net runs everywhere. Sampling is timed over a 10-step DDIM trajectory and reported
per step in extra_info (a step costs the same whatever the number of steps, DDIM-100's included). Around a
network of one 1×1 convolution (issue 17's case: 128×3×256×256 on a GPU) the diffusion ops themselves decide
the time of a training step and of an ancestral step (Diffusion.p_sample).
"""
import importlib.util

import pytest
import torch
from torch import nn

from fastddpm import Diffusion, UNet
from fastddpm.train import Trainer

from .conftest import DEVICES, run

STEPS = 10
E2E_PROVIDERS = ["eager", "compile", "fastddpm", "fast-path", "diffusers", "diffusers-compile"]
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
REFERENCE_PROVIDERS = ("eager", "compile", "diffusers", "diffusers-compile")


class DiffusersNet(nn.Module):
    """diffusers' UNet2DModel called as model(x_t, t)."""

    def __init__(self, unet2d):
        super().__init__()
        self.unet = unet2d

    def forward(self, x, t):
        return self.unet(x, t).sample


def skip_unavailable(device, provider):
    if provider.startswith("diffusers") and not HAS_DIFFUSERS:
        pytest.skip("diffusers is not installed (pip install diffusers)")


def diffusion_for(net_name, device, provider, sampling_timesteps=None, monkeypatch=None):
    skip_unavailable(device, provider)
    if provider in REFERENCE_PROVIDERS and monkeypatch is not None:
        # The U-Net's modules choose their backend per call ("auto"): the reference providers run the
        # reference GroupNorm+SiLU too, for as long as the test (and so the timing) runs.
        monkeypatch.setenv("FASTDDPM_BACKEND", "reference")
    torch.manual_seed(0)
    if net_name == "cifar10":
        net, size = UNet.cifar10(dropout=0.0), 32
    else:
        net, size = UNet.small(), 8
    channels = net.in_channels
    if provider.startswith("diffusers"):
        net = DiffusersNet(net.to_diffusers())
    net = net.to(device)
    if provider.endswith("compile"):
        net = torch.compile(net, mode="reduce-overhead" if device == "cuda" and sampling_timesteps else None)
    backend = "reference" if provider in REFERENCE_PROVIDERS else "auto"
    return Diffusion(net, image_size=size, timesteps=1000, sampling_timesteps=sampling_timesteps,
                     backend=backend, channels=channels).to(device)


def cases(kind):
    """(device, net, precision or batch, provider): the small U-Net on every device (compile on CUDA only;
    diffusers compiled on the CIFAR-10 U-Net only), and on CUDA the CIFAR-10 U-Net's cells of issue 18's
    table."""
    out = []
    for device in DEVICES:
        for provider in E2E_PROVIDERS:
            if provider == "diffusers-compile" or (device == "cpu" and (
                    provider == "compile" or (kind == "sampling" and provider == "fast-path"))):
                continue  # compile: minutes on the CPU; the sampling fast path is a CUDA graph
            if kind == "training":
                out.append((device, "small", "fp32", provider))
            else:
                out += [(device, "small", batch, provider) for batch in (1, 16, 128)]
    if "cuda" in DEVICES:
        if kind == "training":
            out += [("cuda", "cifar10", amp, p) for amp in ("fp32", "bf16") for p in E2E_PROVIDERS
                    if amp == "fp32" or not p.endswith("compile")]
        else:
            out += [("cuda", "cifar10", batch, p) for batch in (1, 64) for p in E2E_PROVIDERS
                    if batch == 1 or not p.endswith("compile")]
    return out


TRAINING, SAMPLING = cases("training"), cases("sampling")


def ids(cases):
    return ["-".join(map(str, case)) for case in cases]


@pytest.mark.parametrize(("device", "net_name", "amp", "provider"), TRAINING, ids=ids(TRAINING))
def test_training_step(benchmark, device, net_name, amp, provider, monkeypatch, tmp_path):
    batch = 128 if device == "cuda" else 32
    if provider == "fast-path":
        torch.manual_seed(0)
        net, size = (UNet.cifar10(dropout=0.0), 32) if net_name == "cifar10" else (UNet.small(), 8)
        d = Diffusion(net, image_size=size, timesteps=1000, channels=net.in_channels)
        images = torch.rand(batch, d.channels, *d.image_size, device=device)
        trainer = Trainer(d, images, out=tmp_path, batch_size=batch, device=device, warmup=1,
                          amp="bf16" if amp == "bf16" else "off", fast_path=True)

        def step():
            return trainer._fast_step([images])[0]

        if device == "cuda":  # the warm-up and the capture before anything is timed, the host's cost too
            while trainer._graph is None and not trainer._graph_failed:
                step()
    else:
        d = diffusion_for(net_name, device, provider, monkeypatch=monkeypatch)
        images = torch.rand(batch, d.channels, *d.image_size, device=device)
        opt = torch.optim.Adam(d.model.parameters(), lr=1e-4)

        def step():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp == "bf16"):
                loss = d(images)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

    loss = run(benchmark, step, device, bytes_moved=0)
    assert torch.isfinite(loss)
    if provider == "fast-path" and device == "cuda":
        assert trainer._graph is not None  # timed as replays of the captured step


@pytest.mark.parametrize(("device", "net_name", "batch", "provider"), SAMPLING, ids=ids(SAMPLING))
def test_sampling_loop(benchmark, device, net_name, batch, provider, monkeypatch):
    d = diffusion_for(net_name, device, provider, sampling_timesteps=STEPS, monkeypatch=monkeypatch)
    graph = provider == "fast-path"

    def sample():
        return d.sample(batch, progress=False, cuda_graph=graph)

    out = run(benchmark, sample, device, bytes_moved=0)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["per step (s)"] = stats.stats.median / STEPS
    assert out.shape == (batch, d.channels, *d.image_size) and torch.isfinite(out).all()
    if graph:
        from fastddpm import sampling

        assert sampling._graphs[d][1] is not None  # captured, not the eager fallback


class PointwiseNet(nn.Module):
    """ε̂ = a 1×1 convolution of x_t plus a learned per-timestep bias: a network that costs next to nothing."""

    def __init__(self, channels=3, timesteps=1000):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.embed = nn.Embedding(timesteps, channels)

    def forward(self, x, t):
        return self.conv(x) + self.embed(t)[:, :, None, None]


POINTWISE_SHAPE = {"cpu": (16, 3, 32, 32), "cuda": (128, 3, 256, 256)}
POINTWISE_PROVIDERS = ["eager", "compile", "fastddpm"]


def pointwise_diffusion(device, provider, monkeypatch):
    torch.manual_seed(0)
    if provider in ("eager", "compile"):
        monkeypatch.setenv("FASTDDPM_BACKEND", "reference")
    net = PointwiseNet().to(device)
    if provider == "compile":
        net = torch.compile(net)
    shape = POINTWISE_SHAPE[device]
    backend = "reference" if provider in ("eager", "compile") else "auto"
    diffusion = Diffusion(net, image_size=shape[2:], timesteps=1000, backend=backend, channels=shape[1])
    return diffusion.to(device), shape


@pytest.mark.parametrize("provider", POINTWISE_PROVIDERS)
def test_training_step_pointwise_net(benchmark, device, provider, monkeypatch):
    d, shape = pointwise_diffusion(device, provider, monkeypatch)
    images = torch.rand(shape, device=device)

    def step():
        loss = d(images)
        loss.backward()
        return loss

    loss = run(benchmark, step, device, bytes_moved=0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("provider", POINTWISE_PROVIDERS)
def test_p_sample_pointwise_net(benchmark, device, provider, monkeypatch):
    d, shape = pointwise_diffusion(device, provider, monkeypatch)
    x = torch.randn(shape, device=device)

    def step():
        with torch.no_grad():
            return d.p_sample(x, 500)[0]

    out = run(benchmark, step, device, bytes_moved=0)
    assert out.shape == x.shape and torch.isfinite(out).all()
