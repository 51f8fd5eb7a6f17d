"""Sampling loops: ancestral DDPM (Algorithm 2) and DDIM (Song et al. 2021).

The loops keep everything on the device: timesteps are built as tensors, the t = 0 case is a mask, and
nothing is read back to the host inside the loop, so the GPU never waits on Python.
"""

from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

from fastddpm import reference


def _progress(iterable, total: int, enabled: bool, desc: str):
    disable = not enabled or os.environ.get("FASTDDPM_NO_PROGRESS", "") not in ("", "0")
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False)


def ddim_timesteps(num_timesteps: int, sampling_timesteps: int) -> list[tuple[int, int]]:
    """(t, t_prev) pairs of an evenly spaced DDIM trajectory, from T − 1 down to the end (t_prev = −1)."""
    times = torch.linspace(-1, num_timesteps - 1, sampling_timesteps + 1).int().tolist()[::-1]
    return list(zip(times[:-1], times[1:]))


def model_dtype(model, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of the network's first floating parameter: what its input is cast to."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), default)


def _run(diffusion, shape, steps, step_fn, generator, return_all_timesteps, progress, desc):
    # The chain x_T → x_0 is kept in float32 whatever the network's dtype; only its input is cast.
    device, net_dtype = diffusion.device, model_dtype(diffusion.model)
    x = torch.randn(shape, generator=generator, device=device)  # x_T ~ N(0, I)
    trajectory = [x] if return_all_timesteps else None
    for t, t_prev in _progress(steps, len(steps), progress, desc):
        tt = torch.full((shape[0],), t, dtype=torch.long, device=device)
        noise = torch.randn(shape, generator=generator, device=device)
        x, _ = step_fn(diffusion._model_output(x.to(net_dtype), tt), x, tt, t_prev, noise)
        if return_all_timesteps:
            trajectory.append(x)
    return torch.stack(trajectory, dim=1) if return_all_timesteps else x


def ancestral_loop(diffusion, shape, generator=None, return_all_timesteps=False, progress=True):
    """T ancestral steps x_T → x_0 with the diffusion's objective, variance and clipping."""
    def step(out, x, tt, t_prev, noise):
        return reference.p_sample_step(diffusion.schedule, out, x, tt, noise, diffusion.objective,
                                       diffusion.variance, diffusion.clip_denoised)

    steps = [(t, t - 1) for t in reversed(range(diffusion.num_timesteps))]
    return _run(diffusion, shape, steps, step, generator, return_all_timesteps, progress, "sampling")


def ddim_loop(diffusion, shape, generator=None, return_all_timesteps=False, progress=True):
    """``diffusion.sampling_timesteps`` DDIM steps with η = ``diffusion.ddim_sampling_eta``."""
    def step(out, x, tt, t_prev, noise):
        prev = torch.full_like(tt, t_prev)
        return reference.ddim_step(diffusion.schedule, out, x, tt, prev, noise, diffusion.objective,
                                   diffusion.ddim_sampling_eta, diffusion.clip_denoised)

    steps = ddim_timesteps(diffusion.num_timesteps, diffusion.sampling_timesteps)
    return _run(diffusion, shape, steps, step, generator, return_all_timesteps, progress, "DDIM sampling")
