"""Tests by op (tests/ops/test_<op>.py), each parametrised over the backends present here: the reference,
the C++ kernels (CPU, where built), Triton (CUDA tensors on a GPU machine; CPU tensors through the interpreter
elsewhere). The float64 oracle every backend is held to is fastddpm.reference run on float64 inputs."""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastddpm import _extension
from fastddpm.schedules import NoiseSchedule, get_beta_schedule

from ..kernel_grid import T


def _triton_present() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def backends_present(op: str) -> list[str]:
    """The backends of ``op`` this machine runs, in the order reference, cpp, triton."""
    from fastddpm.ops import IMPLEMENTATIONS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    present = ["reference"]
    impls = IMPLEMENTATIONS[op]
    built = _extension.cuda_built if device == "cuda" else _extension.cpu_built
    if device in impls.get("cpp", ()) and built():
        present.append("cpp")
    if device in impls.get("triton", ()) and _triton_present():
        present.append("triton")
    return present


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def sched():
    """The linear schedule of T steps, on the device the op tests run on."""
    return NoiseSchedule(get_beta_schedule("linear", T)).to(device())


@pytest.fixture
def tensors_on_device():
    """Every tensor a test makes lives on the test device (a module opts in with usefixtures)."""
    if device().type == "cpu":
        yield
        return
    with torch.device(device()):
        yield


class OpLog(TorchDispatchMode):
    """Records the name of every op dispatched while it is active (what a dispatch mode sees)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def check_triton_path(monkeypatch, kernels, launcher: str, call, op: str) -> None:
    """call() (an entry with backend='triton') launches the Triton kernel ``kernels.<launcher>`` once, eagerly
    and under a dispatch mode, where on CUDA tensors it goes through torch.ops.fastddpm.<op>, whose CUDA
    kernel is the same implementation: the same results either way."""
    launches = []
    launch = getattr(kernels, launcher)
    monkeypatch.setattr(kernels, launcher, lambda *a, **k: launches.append(1) or launch(*a, **k))
    eager = call()
    assert len(launches) == 1
    with OpLog() as log:
        seen = call()
    assert len(launches) == 2
    assert any(f"fastddpm.{op}" in name for name in log.ops) == (device().type == "cuda")
    for a, b in zip(eager, seen):
        assert torch.equal(a, b)
