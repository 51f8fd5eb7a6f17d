"""q_sample with given noise: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε. Reads x_0 and ε, writes x_t."""
import pytest
import torch

from fastddpm import reference
from fastddpm.ops.q_sample import q_sample
from fastddpm.schedules import NoiseSchedule, get_beta_schedule

from .conftest import CIFAR, DEVICES, PROVIDERS, elements, run

# Per device: the streaming-op size (786k elements on the CPU, 25M on a GPU) and a small batch (on a GPU the
# CIFAR-10 training batch, where the per-call host cost decides).
CASES = [(device, shape) for device in DEVICES
         for shape in (elements(device), CIFAR if device == "cuda" else (16, 3, 32, 32))]


@pytest.mark.parametrize(("device", "shape"), CASES,
                         ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_q_sample(benchmark, device, provider, shape):
    sched = NoiseSchedule(get_beta_schedule("linear", 1000)).to(device)
    x0 = torch.randn(shape, device=device)
    noise = torch.randn(shape, device=device)
    t = torch.randint(0, 1000, (shape[0],), device=device)
    if provider == "eager":
        def fn():
            return reference.q_sample(sched, x0, t, noise)
    elif provider == "compile":
        compiled = torch.compile(lambda a, b, c: reference.q_sample(sched, a, b, c))

        def fn():
            return compiled(x0, t, noise)
    else:
        def fn():
            # the chosen backend (C++ on CPU, Triton on CUDA); no argument checks, which read t back to the
            # host (the other providers check nothing either)
            return q_sample(sched, x0, t, noise, check=False)
    out = run(benchmark, fn, device, bytes_moved=3 * x0.numel() * x0.element_size())
    torch.testing.assert_close(out, reference.q_sample(sched, x0, t, noise))
