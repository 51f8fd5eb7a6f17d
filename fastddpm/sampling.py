"""Sampling loops: ancestral DDPM (Algorithm 2) and DDIM (Song et al. 2021).

The loops keep everything on the device: timesteps are built as tensors, the t = 0 case is a mask, and
nothing is read back to the host inside the loop, so the GPU never waits on Python.
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch
from tqdm.auto import tqdm

from fastddpm import ops
from fastddpm.cuda_graphs import host_syncs_raise
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


def model_output(model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The network's output model(x_t, t), checked to have x_t's shape: the one call of the network that the
    loops and Diffusion share."""
    out = model(x, t)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model(x_t, t) must return a tensor of x_t's shape {list(x.shape)}, got {shape}")
    return out


def step_noise(in_kernel: bool, shape, device, generator):
    """(noise, seed) for one step: z ~ torch.randn, or a fresh Philox key (from the same generator) for the
    kernel to draw z with. Either way one step consumes the generator the same way in the loops and in
    Diffusion.p_sample, so a seeded loop equals the chain of single steps."""
    if in_kernel:
        return None, ops.new_seed(device, generator)
    return torch.randn(shape, generator=generator, device=device), None


def _run(diffusion, shape, steps, step_fn, op, generator, return_all_timesteps, progress, desc,
         cuda_graph=False):
    # The chain x_T → x_0 is kept in float32 whatever the network's dtype; only its input is cast.
    device, net_dtype = diffusion.device, model_dtype(diffusion.model)
    x = torch.randn(shape, generator=generator, device=device)  # x_T ~ N(0, I)
    in_kernel = ops.draws_noise_in_kernel(op, device, diffusion.backend)
    if cuda_graph:
        graphed = _cached_graph(diffusion, op, x, step_fn, net_dtype) if _can_graph(device, in_kernel) \
            else None
        if graphed is not None:
            return _run_graphed(graphed, x, steps, generator, return_all_timesteps, progress, desc)
    trajectory = [x] if return_all_timesteps else None
    for t, t_prev in _progress(steps, len(steps), progress, desc):
        tt = torch.full((shape[0],), t, dtype=torch.long, device=device)
        noise, seed = step_noise(in_kernel, shape, device, generator)
        out = model_output(diffusion.model, x.to(net_dtype), tt)
        x = step_fn(out, x, tt, torch.full_like(tt, t_prev), noise, seed=seed)[0]
        if return_all_timesteps:
            trajectory.append(x)
    return torch.stack(trajectory, dim=1) if return_all_timesteps else x


# ----------------------------------------------------------------------------- CUDA graphs
_graph_warnings: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _graph_warnings:
        _graph_warnings.add(message)
        warnings.warn(f"fastddpm: {message}; sampling with the eager loop", RuntimeWarning, stacklevel=4)


def _can_graph(device: torch.device, in_kernel: bool) -> bool:
    if device.type != "cuda":
        _warn_once(f"cuda_graph=True needs CUDA tensors, the model is on {device}")
        return False
    if not in_kernel:
        _warn_once("cuda_graph=True needs the fused reverse step with in-kernel noise (the Triton backend)")
        return False
    return True


class _GraphedStep:
    """One whole sampling step (network + fused reverse step) captured in a CUDA graph, replayed for every t.

    Its inputs live in static device buffers that are refilled before each replay (t, t_prev, the Philox key)
    and x is updated in place, so a replay draws fresh noise and nothing is read back to the host.
    """

    def __init__(self, graph, x, t, t_prev, seed):
        self.graph, self.x, self.t, self.t_prev, self.seed = graph, x, t, t_prev, seed


# The captured steps, per Diffusion (weakly: a graph never keeps a Diffusion alive), outside the module itself
# so that a Diffusion that has sampled with a graph still deep-copies and pickles (EMA copies, checkpoints).
_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _setting(obj, name: str):
    """A backend flag's value for the key. Reading a legacy TF32 flag raises once the new fp32_precision API
    has been used: then the error's text stands for the value."""
    try:
        value = getattr(obj, name, None)
        return value() if callable(value) else value
    except RuntimeError as e:
        return f"unreadable: {e}"


def _backend_settings() -> tuple:
    """The settings that pick the network's kernels (cuDNN algorithms, TF32, reduced-precision reductions)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    return (tuple(_setting(matmul, name) for name in ("allow_tf32", "fp32_precision",
                                                      "allow_fp16_reduced_precision_reduction",
                                                      "allow_bf16_reduced_precision_reduction")),
            tuple(_setting(cudnn, name) for name in ("enabled", "allow_tf32", "fp32_precision", "benchmark",
                                                     "deterministic")),
            _setting(torch.backends, "fp32_precision"), _setting(torch, "get_float32_matmul_precision"))


def _graph_key(diffusion, op, x, net_dtype) -> tuple:
    """Everything the captured kernels depend on. Captured kernels keep the addresses, dtypes and modes they
    were captured with, so the key holds: the addresses of every parameter and buffer (the network's and the
    schedule's: in-place optimizer updates keep them, moving or replacing re-captures); each module's
    train/eval mode (dropout); grad/inference mode (the buffers' kind); the autocast state; the cuDNN/TF32
    settings that pick the kernels; and the sampler's settings. (One pass over the modules: the key is built
    on every sampling call.)"""
    modules = list(diffusion.modules())
    return (op, tuple(x.shape), net_dtype, diffusion.objective, diffusion.variance, diffusion.clip_denoised,
            diffusion.ddim_sampling_eta, diffusion.sampling_timesteps,
            tuple([p.data_ptr() for m in modules for p in m._parameters.values() if p is not None]),
            tuple([b.data_ptr() for m in modules for b in m._buffers.values() if b is not None]),
            tuple([m.training for m in modules]), torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), _backend_settings())


def _cached_graph(diffusion, op, x, step_fn, net_dtype):
    """The captured step for this shape and these settings, captured on first use and kept for the Diffusion
    (one graph, and its memory pool, at a time)."""
    key = _graph_key(diffusion, op, x, net_dtype)
    cached = _graphs.get(diffusion)
    if cached is None or cached[0] != key:
        del cached  # (a reference here would keep the old graph's pool alive through the new capture)
        _graphs.pop(diffusion, None)  # free the old graph's pool before capturing the new one
        _graphs[diffusion] = (key, _graph_step(diffusion, x, step_fn, net_dtype))
    return _graphs[diffusion][1]


def _graph_step(diffusion, x0, step_fn, net_dtype):
    x = x0.clone()
    batch = x.shape[0]
    t = torch.full((batch,), diffusion.num_timesteps - 1, dtype=torch.long, device=x.device)
    t_prev = t - 1
    seed = torch.zeros(1, dtype=torch.long, device=x.device)

    def step():
        out = model_output(diffusion.model, x.to(net_dtype), t)
        x.copy_(step_fn(out, x, t, t_prev, None, seed=seed)[0])

    # Under autocast, without autocast's cache of cast weights: a cached copy would be cast in the warm-up,
    # only read by the graph, and freed when the caller's autocast block ends; the graph casts them itself
    # instead (and so also sees in-place weight updates).
    def uncached_autocast():
        return torch.autocast("cuda", enabled=torch.is_autocast_enabled("cuda"),
                              dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # warm-up before capture (allocator, autotuning, lazy init); the second step raises where the step
        # syncs with the host, before a capture that would fail (cuda_graphs.host_syncs_raise says why)
        with torch.cuda.stream(side), uncached_autocast():
            step()
            with host_syncs_raise():
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads (a DataLoader's pin-memory thread) cannot break the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), uncached_autocast():
            step()
    except Exception as e:  # noqa: BLE001 — any capture failure (a model that syncs, an unsupported op)
        torch.cuda.synchronize()
        _warn_once(f"capturing the sampling step in a CUDA graph failed ({type(e).__name__}: {e})")
        return None
    return _GraphedStep(graph, x, t, t_prev, seed)


def _run_graphed(graphed, x_T, steps, generator, return_all_timesteps, progress, desc):
    graphed.x.copy_(x_T)
    trajectory = [x_T] if return_all_timesteps else None
    for t, t_prev in _progress(steps, len(steps), progress, desc):
        graphed.t.fill_(t)
        graphed.t_prev.fill_(t_prev)
        # the same draw from the generator as the eager loop's step, so a seed gives the same samples
        graphed.seed.copy_(ops.new_seed(graphed.x.device, generator))
        graphed.graph.replay()
        if return_all_timesteps:
            trajectory.append(graphed.x.clone())
    return torch.stack(trajectory, dim=1) if return_all_timesteps else graphed.x.clone()


def ancestral_loop(diffusion, shape, generator=None, return_all_timesteps=False, progress=True,
                   cuda_graph=False):
    """T ancestral steps x_T → x_0 with the diffusion's objective, variance and clipping."""
    def step(out, x, tt, t_prev, noise, seed):
        return reverse_step.p_sample_step(
            diffusion.schedule, out, x, tt, noise, objective=diffusion.objective, variance=diffusion.variance,
            clip_denoised=diffusion.clip_denoised, seed=seed, write_x0=False, backend=diffusion.backend,
            check=False)

    steps = [(t, t - 1) for t in reversed(range(diffusion.num_timesteps))]
    return _run(diffusion, shape, steps, step, "p_sample_step", generator, return_all_timesteps, progress,
                "sampling", cuda_graph)


def ddim_loop(diffusion, shape, generator=None, return_all_timesteps=False, progress=True, cuda_graph=False):
    """``diffusion.sampling_timesteps`` DDIM steps with η = ``diffusion.ddim_sampling_eta``."""
    def step(out, x, tt, t_prev, noise, seed):
        return reverse_step.ddim_step(
            diffusion.schedule, out, x, tt, t_prev, noise, objective=diffusion.objective,
            eta=diffusion.ddim_sampling_eta, clip_denoised=diffusion.clip_denoised, seed=seed, write_x0=False,
            backend=diffusion.backend, check=False)

    steps = ddim_timesteps(diffusion.num_timesteps, diffusion.sampling_timesteps)
    return _run(diffusion, shape, steps, step, "ddim_step", generator, return_all_timesteps, progress,
                "DDIM sampling", cuda_graph)
