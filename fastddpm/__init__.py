"""fastddpm: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) with fused kernels."""

from __future__ import annotations

__version__ = "0.1.0"

from fastddpm import functional, nn, reference, schedules  # noqa: E402
from fastddpm.diffusion import Diffusion  # noqa: E402
from fastddpm.nn import GroupNormSiLU, UNet  # noqa: E402
from fastddpm.nn.patch import patch  # noqa: E402
from fastddpm.schedulers import DDIMScheduler, DDPMScheduler  # noqa: E402
from fastddpm.schedules import NoiseSchedule, get_beta_schedule  # noqa: E402
from fastddpm.train import Trainer  # noqa: E402

__all__ = ["Diffusion", "Trainer", "UNet", "GroupNormSiLU", "NoiseSchedule", "get_beta_schedule", "build_info",
           "DDPMScheduler", "DDIMScheduler", "patch", "functional", "nn", "reference", "schedules", "__version__"]


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
