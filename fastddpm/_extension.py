"""The C++ extension fastddpm._C: loaded on first use, never compiled at import.

setup.py builds it (``pip install -e . --no-build-isolation`` or ``make``); importing it registers the C++
ops as torch.ops.fastddpm.<op>. When it is missing, :func:`load` warns once and the ops fall back to the
PyTorch reference.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotations only: torch is imported where it is used
    import torch

_UNLOADED = object()
_ext = _UNLOADED  # the loaded module, None when it failed; a plain global (not functools.cache) so that
                  # torch.compile traces the callers without warnings


def load() -> ModuleType | None:
    """fastddpm._C, or None (with one RuntimeWarning per process) when it is not built or does not load."""
    global _ext
    if _ext is not _UNLOADED:
        return _ext
    import torch  # noqa: F401  (loads libtorch, which fastddpm._C links against)

    try:
        from fastddpm import _C
    except ImportError as e:
        warnings.warn(
            f"fastddpm: the C++ extension fastddpm._C is not built or does not load ({e}); its ops fall back "
            "to the PyTorch reference. Build it with `pip install -e . --no-build-isolation` or `make`.",
            RuntimeWarning, stacklevel=2)
        _C = None
    _ext = _C
    if _C is not None:
        # The ops' fake impls and autograd are registered by fastddpm/ops/<op>.py: importing the package
        # imports them all, so that torch.ops.fastddpm.<op> is complete however the schemas were loaded.
        import fastddpm.ops  # noqa: F401
    return _ext


def build_digest() -> str:
    """A short hash of the built fastddpm._C (and of torch's version), found without loading it; "none"
    without a build. torch.compile's on-disk caches key a graph on its Python-visible ops, not on the C++
    autograd kernels behind them: a cache folder per digest keeps graphs of one build from being loaded for
    another."""
    import hashlib
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("fastddpm._C")
    if spec is None or spec.origin is None:
        return "none"
    digest = hashlib.sha256(importlib.metadata.version("torch").encode())
    with open(spec.origin, "rb") as f:
        digest.update(f.read())
    return digest.hexdigest()[:16]


def cpu_built() -> bool:
    """Whether the C++ CPU kernels are available."""
    return load() is not None


def cuda_built() -> bool:
    """Whether fastddpm._C was compiled with its CUDA sources."""
    ext = load()
    return ext is not None and bool(ext.with_cuda)


def cuda_archs() -> list[str]:
    """The GPU architectures fastddpm._C was compiled for, e.g. ['8.0', '9.0']; [] without CUDA."""
    ext = load()
    return [a for a in ext.cuda_archs.split(";") if a] if ext is not None else []


def check_device(device) -> "torch.device":
    """torch.device(device), or a clear error where this torch cannot use it (CUDA without a CUDA build or a
    GPU), instead of the AssertionError that moving a tensor there raises."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)")
            raise RuntimeError(f"CUDA is not available: {why}; cannot use device {str(device)!r}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {str(device)!r} does not exist: this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s)")
    return device
