"""Op registration (fake, autograd, opcheck) and the choice of backend."""
import os
import warnings

import pytest
import torch

import fastddpm
from fastddpm import Diffusion, reference
from fastddpm.ops import choose_backend
from fastddpm.schedules import NoiseSchedule, get_beta_schedule

from .conftest import TinyNet, needs_triton_interpreter, rel_err


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule(get_beta_schedule("cosine", 100))


def test_cpp_extension_is_built_and_chosen_on_cpu():
    info = fastddpm.build_info()
    assert info["cpu_extension"] is True
    assert info["backends"]["cpu"]["q_sample"] == "cpp"
    assert info["torch"] == torch.__version__


def test_backend_choice(monkeypatch, sched):
    assert choose_backend("q_sample", "cpu") == "cpp"
    assert choose_backend("q_sample", "cpu", "reference") == "reference"
    monkeypatch.setenv("FASTDDPM_BACKEND", "reference")
    assert choose_backend("q_sample", "cpu") == "reference"
    assert choose_backend("q_sample", "cpu", "cpp") == "cpp"  # an explicit argument wins over the variable
    monkeypatch.delenv("FASTDDPM_BACKEND")
    # the fused ops have C++ CPU kernels (csrc/cpu/); an op without one falls back with one warning
    for op in ("diffusion_loss", "p_sample_step", "ddim_step"):
        assert choose_backend(op, "cpu") == "cpp"
    # (C++ for CUDA tensors exists for none of them: the Triton kernels are their CUDA implementation)
    with pytest.warns(RuntimeWarning, match="no cpp implementation of diffusion_loss for cuda tensors"):
        assert choose_backend("diffusion_loss", "cuda", "cpp") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already
        assert choose_backend("diffusion_loss", "cuda", "cpp") == "reference"
    # Triton runs CPU tensors only through its interpreter, and only when asked for: never by default.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend("diffusion_loss", "cpu", "triton") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.warns(RuntimeWarning, match="no triton implementation of p_sample_step"):
        assert choose_backend("p_sample_step", "cpu", "triton") == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        choose_backend("q_sample", "cpu", "fast")
    monkeypatch.setenv("FASTDDPM_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTDDPM_BACKEND='cuda' is not a backend"):
        choose_backend("q_sample", "cpu")
    monkeypatch.delenv("FASTDDPM_BACKEND")
    # os.environ replaced by another mapping: read through it
    monkeypatch.setattr(os, "environ", {**os.environ, "FASTDDPM_BACKEND": "reference"})
    assert choose_backend("q_sample", "cpu") == "reference"
    monkeypatch.undo()
    assert choose_backend("q_sample", "cpu") == "cpp"
    # where os.environ has no byte dict to read (not POSIX), the same answers through os.environ.get
    monkeypatch.setattr(fastddpm.ops._dispatch, "_POSIX_ENVIRON", False)
    monkeypatch.setenv("FASTDDPM_BACKEND", "reference")
    assert choose_backend("q_sample", "cpu") == "reference"
    monkeypatch.setenv("FASTDDPM_BACKEND", "bad\udcff")  # (not UTF-8: an error that names the variable)
    with pytest.raises(ValueError, match="is not a backend"):
        choose_backend("q_sample", "cpu")
    monkeypatch.delenv("FASTDDPM_BACKEND")
    assert choose_backend("q_sample", "cpu") == "cpp"


def test_launcher_under_dispatch_modes():
    """A Triton kernel launches through wrap_triton where a dispatch mode builds a graph (make_fx, fake
    tensors), and directly on plain tensors outside modes (and, before torch 2.13, whose wrap_triton refuses
    the interpreter's kernels, on CPU tensors under a mode that builds none)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.library import wrap_triton
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastddpm.ops import _dispatch, launcher

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x = torch.randn(3)
    assert launcher(x) is not wrap_triton and not _dispatch.graph_building_mode_active()
    with Watch():
        assert not _dispatch.graph_building_mode_active()
        assert (launcher(x) is wrap_triton) == _dispatch.WRAP_TRITON_TAKES_INTERPRETED
    with FakeTensorMode() as mode:
        assert _dispatch.graph_building_mode_active()
        assert launcher(mode.from_tensor(x)) is wrap_triton
        assert launcher(x) is wrap_triton
    traced = []
    torch.fx.experimental.proxy_tensor.make_fx(
        lambda t: traced.append((_dispatch.graph_building_mode_active(), launcher(t))) or t * 2)(x)
    assert traced == [(True, wrap_triton)]


@pytest.mark.parametrize("backend", ["reference", "cpp",
                                     pytest.param("triton", marks=needs_triton_interpreter)])
def test_diffusion_backends_agree(backend):
    torch.manual_seed(0)
    d = Diffusion(TinyNet(timesteps=50), image_size=6, timesteps=50, beta_schedule="cosine", backend=backend)
    x0, noise = torch.randn(3, 3, 6, 6), torch.randn(3, 3, 6, 6)
    t = torch.tensor([0, 17, 49])
    assert rel_err(d.q_sample(x0, t, noise),
                   reference.q_sample(d.schedule, x0.double(), t, noise.double())) < 1e-6


def test_missing_extension_warns_once_and_falls_back():
    import subprocess
    import sys

    code = """
import sys, warnings
sys.modules['fastddpm._C'] = None  # as if the extension were never built
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    import torch, fastddpm
    from fastddpm import Diffusion
    info = fastddpm.build_info()
    class Net(torch.nn.Conv2d):
        def forward(self, x, t):
            return super().forward(x)
    d = Diffusion(Net(3, 3, 1), image_size=4, timesteps=10, beta_schedule='cosine', channels=3)
    x0 = torch.randn(2, 3, 4, 4)
    loss = d.p_losses(x0, torch.tensor([1, 9]))
n = sum('not built' in str(w.message) for w in caught)
print(n, info['cpu_extension'], info['backends']['cpu']['q_sample'], bool(torch.isfinite(loss)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "False", "reference", "True"]
