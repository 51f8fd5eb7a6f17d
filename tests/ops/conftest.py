"""Tests by op (tests/ops/test_<op>.py), each parametrised over the backends present here: the reference,
the C++ kernels (CPU, where built), Triton (CUDA tensors on a GPU machine; CPU tensors through the interpreter
elsewhere). The float64 oracle every backend is held to is fastddpm.reference run on float64 inputs."""
import os

import torch

from fastddpm import _extension


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
