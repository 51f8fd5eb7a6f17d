"""Sampling loops: ancestral DDPM (Algorithm 2) and DDIM (Song et al. 2021).

The loops keep everything on the device: timesteps are built as tensors, the t = 0 case is a mask, and
nothing is read back to the host inside the loop, so the GPU never waits on Python.
"""

from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

from fastddpm import ops
from fastddpm.ops import reverse_step


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


def step_noise_in_kernel(diffusion, op: str) -> bool:
    """Whether the step noise z is drawn inside the fused kernel (Triton, or the C++ CPU kernels) rather than by
    torch.randn."""
    return ops.choose_backend(op, diffusion.device, diffusion.backend) in ("triton", "cpp")


def step_noise(in_kernel: bool, shape, device, generator):
    """(noise, seed) for one step: z ~ torch.randn, or a fresh Philox key (from the same generator) for the
    kernel to draw z with. Either way one step consumes the generator the same way in the loops and in
    Diffusion.p_sample, so a seeded loop equals the chain of single steps."""
    if in_kernel:
        return None, ops.new_seed(device, generator)
    return torch.randn(shape, generator=generator, device=device), None


def _run(diffusion, shape, steps, step_fn, op, generator, return_all_timesteps, progress, desc):
    # The chain x_T → x_0 is kept in float32 whatever the network's dtype; only its input is cast.
    device, net_dtype = diffusion.device, model_dtype(diffusion.model)
    x = torch.randn(shape, generator=generator, device=device)  # x_T ~ N(0, I)
    trajectory = [x] if return_all_timesteps else None
    in_kernel = step_noise_in_kernel(diffusion, op)
    for t, t_prev in _progress(steps, len(steps), progress, desc):
        tt = torch.full((shape[0],), t, dtype=torch.long, device=device)
        noise, seed = step_noise(in_kernel, shape, device, generator)
        out = diffusion._model_output(x.to(net_dtype), tt)
        x = step_fn(out, x, tt, t_prev, noise, seed=seed, offset=0)[0]
        if return_all_timesteps:
            trajectory.append(x)
    return torch.stack(trajectory, dim=1) if return_all_timesteps else x


def ancestral_loop(diffusion, shape, generator=None, return_all_timesteps=False, progress=True):
    """T ancestral steps x_T → x_0 with the diffusion's objective, variance and clipping."""
    def step(out, x, tt, t_prev, noise, seed, offset):
        return reverse_step.p_sample_step(
            diffusion.schedule, out, x, tt, noise, objective=diffusion.objective, variance=diffusion.variance,
            clip_denoised=diffusion.clip_denoised, seed=seed, offset=offset, write_x0=False,
            backend=diffusion.backend, check=False)

    steps = [(t, t - 1) for t in reversed(range(diffusion.num_timesteps))]
    return _run(diffusion, shape, steps, step, "p_sample_step", generator, return_all_timesteps, progress,
                "sampling")


def ddim_loop(diffusion, shape, generator=None, return_all_timesteps=False, progress=True):
    """``diffusion.sampling_timesteps`` DDIM steps with η = ``diffusion.ddim_sampling_eta``."""
    def step(out, x, tt, t_prev, noise, seed, offset):
        prev = torch.full_like(tt, t_prev)
        return reverse_step.ddim_step(
            diffusion.schedule, out, x, tt, prev, noise, objective=diffusion.objective,
            eta=diffusion.ddim_sampling_eta, clip_denoised=diffusion.clip_denoised, seed=seed, offset=offset,
            write_x0=False, backend=diffusion.backend, check=False)

    steps = ddim_timesteps(diffusion.num_timesteps, diffusion.sampling_timesteps)
    return _run(diffusion, shape, steps, step, "ddim_step", generator, return_all_timesteps, progress,
                "DDIM sampling")
