"""q_sample: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM eq. 4), per-sample t read from the schedule tables.

Two ops, each with a C++ schema (csrc/fastddpm.cpp) and a Triton twin of the same signature defined here
with ``triton_op`` (kernels/q_sample.py; CUDA tensors, or CPU tensors through the Triton interpreter):
  q_sample(x_start, t, sqrt_ac, sqrt_1m_ac, noise) -> x_t                        ε given
  q_sample_philox(x_start, t, sqrt_ac, sqrt_1m_ac, seed, offset, write_noise) -> (x_t, ε or [0])
                                                                                  ε drawn in-kernel
This file adds fake impls and autograd to both, a CPU impl of q_sample_philox on the reference math and Philox
stream (registered only in a build without csrc/cpu/q_sample.cpp's fused one), and chooses the backend per call.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from fastddpm import _extension, reference
from fastddpm.ops import (as_layout_of, call_op, check_data, check_index, check_seed, check_table, check_timesteps,
                          check_triton_device, choose_backend, dense, launcher, new_seed, register_fake,
                          runs_eagerly)

NAME = "q_sample"


def _check(x_start, t, sqrt_ac, sqrt_1m_ac):
    check_data(NAME, "x_start", x_start)
    check_index(NAME, "t", t, x_start)
    check_table(NAME, "sqrt_alphas_cumprod", sqrt_ac, x_start)
    check_table(NAME, "sqrt_one_minus_alphas_cumprod", sqrt_1m_ac, x_start)


# ----------------------------------------------------------------------------- Triton
def _q_sample_triton(x_start: torch.Tensor, t: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
                    sqrt_one_minus_alphas_cumprod: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    from fastddpm.kernels.q_sample import launch_q_sample

    _check(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    check_data(NAME, "noise", noise, x_start)
    check_triton_device(NAME, x_start)
    x = dense(x_start)
    out = torch.empty_like(x)
    launch_q_sample(x, t.contiguous(), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, out,
                    noise=as_layout_of(noise.to(x.dtype), x), wrap=launcher(x))
    return out


def _q_sample_philox_triton(x_start: torch.Tensor, t: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
                           sqrt_one_minus_alphas_cumprod: torch.Tensor, seed: torch.Tensor, offset: int,
                           write_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastddpm.kernels.q_sample import launch_q_sample

    _check(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    check_seed(NAME, seed, x_start)
    check_triton_device(NAME, x_start)
    x = dense(x_start)
    out = torch.empty_like(x)
    noise = torch.empty_like(x) if write_noise else x.new_empty(0)
    launch_q_sample(x, t.contiguous(), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, out, seed=seed, offset=offset,
                    noise_out=noise if write_noise else None, wrap=launcher(x))
    return out, noise


q_sample_triton = triton_op("fastddpm::q_sample_triton", _q_sample_triton, mutates_args=())
q_sample_philox_triton = triton_op("fastddpm::q_sample_philox_triton", _q_sample_philox_triton, mutates_args=())


# ----------------------------------------------------------------------------- CPU (reference math)
def q_sample_philox_cpu(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, offset, write_noise):
    _check(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    check_seed(NAME, seed, x_start)
    x = dense(x_start)
    batch = x.shape[0]
    eps = philox_noise_like(x, seed, offset)
    out = torch.empty_like(x).copy_(reference.q_sample(_Tables(sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod),
                                                       x, t, eps))
    return out, (torch.empty_like(x).copy_(eps) if write_noise else x.new_empty(0))


def philox_noise_like(x: torch.Tensor, seed: torch.Tensor, offset: int) -> torch.Tensor:
    """The kernels' noise for a batch-outer dense x (float32, x's shape): element i of sample b in memory
    order gets reference.philox_normal(seed, offset, B, N)[b, i]."""
    batch = x.shape[0]
    flat = reference.philox_normal(int(seed.reshape(-1)[0]), offset, batch, x.numel() // max(batch, 1), x.device)
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), -x.shape[d]))  # outermost → innermost in memory
    return flat.reshape([x.shape[d] for d in order]).permute([order.index(d) for d in range(x.dim())])


class _Tables:
    """The two tables q_sample reads, under the names reference.q_sample looks up."""

    def __init__(self, sqrt_ac, sqrt_1m_ac):
        self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod = sqrt_ac, sqrt_1m_ac


# ----------------------------------------------------------------------------- fake impls and autograd
def _fake_q_sample(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise):
    _check(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    check_data(NAME, "noise", noise, x_start)
    return torch.empty_like(dense(x_start))


def _q_sample_cuda(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise):
    """The C++ op on CUDA tensors: the Triton kernel, returned in empty_like(x_start)'s layout as on the CPU."""
    out = _q_sample_triton(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise)
    like = torch.empty_like(x_start)
    return out if like.stride() == out.stride() else like.copy_(out)


def _fake_q_sample_cpp(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise):
    _check(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    check_data(NAME, "noise", noise, x_start)
    return torch.empty_like(x_start)  # what csrc/cpu/q_sample.cpp allocates, for any dense layout


def _fake_q_sample_philox(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, offset, write_noise):
    _check(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    check_seed(NAME, seed, x_start)
    x = dense(x_start)
    return torch.empty_like(x), (torch.empty_like(x) if write_noise else x.new_empty(0))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2], inputs[3])


def _grad(ctx, index, table, grad):
    t = ctx.saved_tensors[0]
    return (reference.extract(table, t, grad) * grad).to(grad.dtype) if ctx.needs_input_grad[index] else None


def _backward_q_sample(ctx, grad):
    # ∂x_t/∂x_0 = √ᾱ_t, ∂x_t/∂ε = √(1 − ᾱ_t); the tables and t get no gradient.
    _, sqrt_ac, sqrt_1m_ac = ctx.saved_tensors
    return _grad(ctx, 0, sqrt_ac, grad), None, None, None, _grad(ctx, 4, sqrt_1m_ac, grad)


def _backward_q_sample_philox(ctx, grad, _grad_noise):
    return _grad(ctx, 0, ctx.saved_tensors[1], grad), None, None, None, None, None, None


def _register() -> None:
    ops = [("fastddpm::q_sample_triton", _fake_q_sample, _backward_q_sample),
           ("fastddpm::q_sample_philox_triton", _fake_q_sample_philox, _backward_q_sample_philox)]
    if _extension.load() is not None:
        ops += [("fastddpm::q_sample", _fake_q_sample_cpp, _backward_q_sample),
                ("fastddpm::q_sample_philox", _fake_q_sample_philox, _backward_q_sample_philox)]
        torch.library.register_kernel("fastddpm::q_sample", "cuda", _q_sample_cuda)
        torch.library.register_kernel("fastddpm::q_sample_philox", "cuda", _q_sample_philox_triton)
        if not torch._C._dispatch_has_kernel_for_dispatch_key("fastddpm::q_sample_philox", "CPU"):
            torch.library.register_kernel("fastddpm::q_sample_philox", "cpu", q_sample_philox_cpu)
    for name, fake, backward in ops:
        register_fake(name, fake)
        torch.library.register_autograd(name, backward, setup_context=_setup)


_register()


# ----------------------------------------------------------------------------- the Python entry point
def q_sample(schedule, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None, *,
             seed: torch.Tensor | None = None, offset: int = 0, write_noise: bool = False,
             generator: torch.Generator | None = None, backend: str = "auto", check: bool = True):
    """x_t for per-sample timesteps ``t`` on the chosen backend.

    With ``noise`` given, returns x_t. Without, ε is drawn in-kernel from Philox key ``seed`` (int64 [1] on
    x's device; a fresh one from torch's RNG, or ``generator``, when None) at counter ``offset``, and the
    result is (x_t, ε) with ε written only when ``write_noise`` (else an empty tensor). The reference backend
    draws the same stream with fastddpm.reference.philox_normal.
    """
    if check:
        check_timesteps(NAME, t, schedule.sqrt_alphas_cumprod.shape[0])
    backend = choose_backend(NAME, x_start.device, backend)
    tables = (schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod)
    if noise is not None:
        if backend == "triton":
            if runs_eagerly(x_start, noise):
                return _q_sample_triton(x_start, t, *tables, noise)
            return torch.ops.fastddpm.q_sample_triton(x_start, t, *tables, noise)
        if backend == "cpp":
            return call_op(torch.ops.fastddpm.q_sample.default, x_start, t, *tables, noise)
        return reference.q_sample(schedule, x_start, t, noise)
    if seed is None:
        seed = new_seed(x_start.device, generator)
    if backend == "triton":
        if runs_eagerly(x_start):
            return _q_sample_philox_triton(x_start, t, *tables, seed, offset, write_noise)
        return torch.ops.fastddpm.q_sample_philox_triton(x_start, t, *tables, seed, offset, write_noise)
    if backend == "cpp" and _extension.cpu_built():
        return call_op(torch.ops.fastddpm.q_sample_philox.default, x_start, t, *tables, seed, offset, write_noise)
    return q_sample_philox_cpu(x_start, t, *tables, seed, offset, write_noise)
