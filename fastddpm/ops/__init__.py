"""Custom ops of the ``fastddpm`` namespace and the choice of backend for each call.

Each op has up to three implementations: ``reference`` (PyTorch, always there), ``triton`` (kernels/)
and ``cpp`` (csrc/: CPU, and CUDA where written). ``choose_backend`` picks one per call from the
tensors' device, ``FASTDDPM_BACKEND`` or an explicit ``backend=``; a missing build warns once and falls
back to the reference.
"""

from __future__ import annotations

import os
import warnings

import torch

from fastddpm import _extension

BACKENDS = ("auto", "reference", "triton", "cpp")

# Which compiled implementations exist, per op and device type. Kernel issues extend this table.
IMPLEMENTATIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "q_sample": {"cpp": ("cpu",), "triton": ()},
    "diffusion_loss": {"cpp": (), "triton": ()},
    "p_sample_step": {"cpp": (), "triton": ()},
    "ddim_step": {"cpp": (), "triton": ()},
    "group_norm_silu": {"cpp": ("cpu", "cuda"), "triton": ()},
}

_warned: set[tuple[str, str, str]] = set()


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def _available(op: str, backend: str, device_type: str) -> bool:
    if backend == "reference":
        return True
    if device_type not in IMPLEMENTATIONS[op][backend]:
        return False
    if backend == "cpp":
        return _extension.cuda_built() if device_type == "cuda" else _extension.cpu_built()
    try:  # triton
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(op: str, device: torch.device | str, backend: str = "auto") -> str:
    """The implementation that runs ``op`` on ``device``: 'reference', 'triton' or 'cpp'."""
    device_type = torch.device(device).type
    requested = check_backend(backend)
    if requested == "auto":
        requested = os.environ.get("FASTDDPM_BACKEND", "auto") or "auto"
        if requested not in BACKENDS:
            raise ValueError(f"FASTDDPM_BACKEND={requested!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    if requested == "auto":
        order = ("triton", "cpp") if device_type == "cuda" else ("cpp", "triton")
        if op == "group_norm_silu":  # the U-Net's GroupNorm+SiLU is CUDA C++ on GPUs
            order = ("cpp", "triton")
        for candidate in order:
            if _available(op, candidate, device_type):
                return candidate
        return "reference"
    if not _available(op, requested, device_type):
        key = (op, requested, device_type)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"fastddpm: no {requested} implementation of {op} for {device_type} tensors "
                          f"in this build; using the reference", RuntimeWarning, stacklevel=3)
        return "reference"
    return requested
