"""fastddpm: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) with fused kernels."""

from __future__ import annotations

__version__ = "0.1.0"

import importlib

# The public names load on first use (PEP 562), so that `import fastddpm` and `fastddpm --help` do not import
# torch; `from fastddpm import Diffusion` and `fastddpm.Diffusion` work as ever.
_PUBLIC = {"Diffusion": "fastddpm.diffusion", "Trainer": "fastddpm.train", "UNet": "fastddpm.nn",
           "GroupNormSiLU": "fastddpm.nn", "patch": "fastddpm.nn.patch",
           "DDIMScheduler": "fastddpm.schedulers", "DDPMScheduler": "fastddpm.schedulers",
           "NoiseSchedule": "fastddpm.schedules", "get_beta_schedule": "fastddpm.schedules"}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif not name.startswith("__"):
        try:  # a submodule: fastddpm.nn, fastddpm.reference, ...
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = ["Diffusion", "Trainer", "UNet", "GroupNormSiLU", "NoiseSchedule", "get_beta_schedule",
           "build_info", "DDPMScheduler", "DDIMScheduler", "patch", "functional", "nn", "reference",
           "schedules", "__version__"]


def build_info() -> dict:
    """What this installation runs: versions, which extensions were built, and each op's backend."""
    import torch

    from fastddpm import _extension
    from fastddpm.ops import IMPLEMENTATIONS, choose_backend

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "fastddpm": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cpu_extension": _extension.cpu_built(),
        "cuda_extension": _extension.cuda_built(),
        "cuda_archs": _extension.cuda_archs(),
        "cuda_available": torch.cuda.is_available(),
        "backends": {dev: {op: choose_backend(op, dev) for op in IMPLEMENTATIONS} for dev in devices},
    }
