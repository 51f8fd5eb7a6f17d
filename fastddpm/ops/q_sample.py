"""q_sample: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM eq. 4), per-sample t read from the schedule tables.

The schema lives in csrc/fastddpm.cpp; this file adds its fake (meta) implementation and autograd, and
chooses the backend per call.
"""

from __future__ import annotations

import torch

from fastddpm import _extension, reference
from fastddpm.ops import choose_backend

OP = "fastddpm::q_sample"


def _register() -> None:
    if _extension.load() is None:
        return

    @torch.library.register_fake(OP)
    def _(x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise):
        torch._check(noise.shape == x_start.shape, lambda: "noise must have the shape of x_start")
        torch._check(t.dim() == 1 and t.shape[0] == x_start.shape[0], lambda: "t must have shape [B]")
        return torch.empty_like(x_start)

    def setup_context(ctx, inputs, output):
        _, t, sqrt_ac, sqrt_1m_ac, _ = inputs
        ctx.save_for_backward(t, sqrt_ac, sqrt_1m_ac)

    def backward(ctx, grad):
        # ∂x_t/∂x_0 = √ᾱ_t, ∂x_t/∂ε = √(1 − ᾱ_t); the tables and t get no gradient.
        t, sqrt_ac, sqrt_1m_ac = ctx.saved_tensors
        grad_x = grad_noise = None
        if ctx.needs_input_grad[0]:
            grad_x = (reference.extract(sqrt_ac, t, grad) * grad).to(grad.dtype)
        if ctx.needs_input_grad[4]:
            grad_noise = (reference.extract(sqrt_1m_ac, t, grad) * grad).to(grad.dtype)
        return grad_x, None, None, None, grad_noise

    torch.library.register_autograd(OP, backward, setup_context=setup_context)


_register()


def q_sample(schedule, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             backend: str = "auto") -> torch.Tensor:
    """Noised x_t for per-sample timesteps ``t`` with the given ``noise``, on the chosen backend."""
    if choose_backend("q_sample", x_start.device, backend) == "cpp":
        return torch.ops.fastddpm.q_sample(x_start, t, schedule.sqrt_alphas_cumprod,
                                           schedule.sqrt_one_minus_alphas_cumprod, noise)
    return reference.q_sample(schedule, x_start, t, noise)
