"""q_sample: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM eq. 4), per-sample t read from the schedule tables.

One op, its schema in csrc/fastddpm.cpp:
  q_sample(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise?, seed?, offset, write_noise)
      -> (x_t, ε or an empty tensor)
with ε given (``noise``) or drawn in-kernel from the Philox key ``seed`` at counter ``offset`` (exactly one of
the two); the drawn ε is returned when ``write_noise``, else an empty tensor (so always with a given noise).
Its CPU kernel is C++ (csrc/cpu/q_sample.cpp); its CUDA kernel is the Triton implementation below
(kernels/q_sample.py), registered here with the op's fake and autograd.

Layout, the same on every backend and in the fake: x_t (and the drawn ε) are ``empty_like(dense(x_start))``:
x_start's own strides when its memory is dense with each sample one contiguous block (contiguous,
channels_last, ...), else contiguous.
"""

from __future__ import annotations

import torch

from fastddpm import _extension, reference
from fastddpm.ops import (
    as_layout_of,
    autograd_function,
    call_op,
    check_data,
    check_index,
    check_seed,
    check_table,
    check_timesteps,
    check_triton_device,
    choose_backend,
    dense,
    launcher,
    new_seed,
    register_fake,
    require,
    runs_eagerly,
)
from fastddpm.ops._dispatch import buffers

NAME = "q_sample"


def _check(x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed):
    check_data(NAME, "x_start", x_start)
    check_index(NAME, "t", t, x_start)
    check_table(NAME, "sqrt_alphas_cumprod", sqrt_ac, x_start)
    check_table(NAME, "sqrt_one_minus_alphas_cumprod", sqrt_1m_ac, x_start)
    require((noise is None) != (seed is None), lambda: f"{NAME}: give exactly one of noise and seed")
    if noise is not None:
        check_data(NAME, "noise", noise, x_start)
    else:
        check_seed(NAME, seed, x_start)


def _fake(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise, seed, offset, write_noise):
    _check(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise, seed)
    x = dense(x_start)
    return torch.empty_like(x), (torch.empty_like(x) if write_noise and noise is None else x.new_empty(0))


# ----------------------------------------------------------------------------- Triton (the CUDA kernel)
def _q_sample_triton(x_start: torch.Tensor, t: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
                     sqrt_one_minus_alphas_cumprod: torch.Tensor, noise: torch.Tensor | None,
                     seed: torch.Tensor | None, offset: int,
                     write_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, noise_out = _launch_triton(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise,
                                    seed, offset, write_noise)
    return out, (noise_out if noise_out is not None else out.new_empty(0))


def _launch_triton(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise, seed, offset,
                   write_noise) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton implementation's work: (x_t, ε or None where it is not written)."""
    from fastddpm.kernels.q_sample import launch_q_sample

    _check(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise, seed)
    check_triton_device(NAME, x_start)
    x = dense(x_start)
    out = torch.empty_like(x)
    noise_out = torch.empty_like(x) if write_noise and noise is None else None
    launch_q_sample(x, t.contiguous(), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, out,
                    noise=None if noise is None else as_layout_of(noise.to(x.dtype), x), seed=seed,
                    offset=offset, noise_out=noise_out, wrap=launcher(x))
    return out, noise_out


# ----------------------------------------------------------------------------- the reference backend
def _q_sample_reference(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise, seed, offset,
                        write_noise):
    """fastddpm.reference's math; a drawn ε is the kernels' Philox stream (reference.philox_normal), and the
    outputs have the op's layout."""
    tables = _Tables(sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    if noise is not None:
        return reference.q_sample(tables, x_start, t, noise), None
    _check(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise, seed)
    x = dense(x_start)
    eps = philox_noise_like(x, seed, offset)
    out = torch.empty_like(x).copy_(reference.q_sample(tables, x, t, eps))
    return out, (torch.empty_like(x).copy_(eps) if write_noise else x.new_empty(0))


def philox_noise_like(x: torch.Tensor, seed: torch.Tensor, offset: int) -> torch.Tensor:
    """The kernels' noise for a batch-outer dense x (float32, x's shape): element i of sample b in memory
    order gets reference.philox_normal(seed, offset, B, N)[b, i]."""
    batch = x.shape[0]
    flat = reference.philox_normal(int(seed.reshape(-1)[0]), offset, batch, x.numel() // max(batch, 1),
                                   x.device)
    # outermost → innermost in memory
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), -x.shape[d]))
    return flat.reshape([x.shape[d] for d in order]).permute([order.index(d) for d in range(x.dim())])


class _Tables:
    """The two tables q_sample reads, under the names reference.q_sample looks up."""

    def __init__(self, sqrt_ac, sqrt_1m_ac):
        self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod = sqrt_ac, sqrt_1m_ac


# ----------------------------------------------------------------------------- autograd: one, two ways in
def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2], inputs[3])


def _grad(ctx, index, table, grad):
    t = ctx.saved_tensors[0]
    return (reference.extract(table, t, grad) * grad).to(grad.dtype) if ctx.needs_input_grad[index] else None


def _backward(ctx, grad, _grad_noise):
    # ∂x_t/∂x_0 = √ᾱ_t, ∂x_t/∂ε = √(1 − ᾱ_t) for a given ε; t, the tables, the key and a drawn ε get none.
    _, sqrt_ac, sqrt_1m_ac = ctx.saved_tensors
    return _grad(ctx, 0, sqrt_ac, grad), None, None, None, _grad(ctx, 4, sqrt_1m_ac, grad), None, None, None


# The Triton implementation under the op's autograd, for calls that skip the dispatcher.
_QSampleTriton = autograd_function("QSampleTriton", _q_sample_triton, _setup_context, _backward)

if _extension.load() is not None:
    register_fake("fastddpm::q_sample", _fake)
    torch.library.register_autograd("fastddpm::q_sample", _backward, setup_context=_setup_context)
    torch.library.register_kernel("fastddpm::q_sample", "cuda", _q_sample_triton)


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
    sqrt_ac, sqrt_1m_ac = buffers(schedule, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
    if check:
        check_timesteps(NAME, t, sqrt_ac.shape[0])
    backend = choose_backend(NAME, x_start.device, backend)
    if noise is not None:
        seed, write_noise = None, False  # (a key or write_noise with a given ε has nothing to do)
    elif seed is None:
        seed = new_seed(x_start.device, generator)
    args = (x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset, write_noise)
    if backend == "cpp":
        out = call_op(torch.ops.fastddpm.q_sample.default, *args)
    elif backend == "triton":
        if runs_eagerly(x_start, noise):
            if noise is not None:  # (x_t alone: no empty ε to allocate)
                return _launch_triton(*args)[0]
            out = _q_sample_triton(*args)
        elif x_start.is_cuda and _extension.load() is not None:
            out = call_op(torch.ops.fastddpm.q_sample.default, *args)  # its CUDA kernel is _q_sample_triton
        else:
            out = _QSampleTriton.apply(*args)
    else:
        out = _q_sample_reference(*args)
    return out[0] if noise is not None else out
