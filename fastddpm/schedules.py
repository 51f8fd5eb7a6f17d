"""β schedules (built in float64) and the NoiseSchedule tables derived from them.

The forward process of DDPM (Ho et al. 2020, eq. 2) adds Gaussian noise with variances β_1…β_T; with
α_t = 1 − β_t and ᾱ_t = ∏_{s≤t} α_s its marginal is q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (eq. 4).
Timesteps are 0-based here, as in the paper's code: index t ∈ [0, T) holds the paper's step t + 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fastddpm import contracts

__all__ = ["BETA_SCHEDULES", "get_beta_schedule", "NoiseSchedule"]


def _linear(timesteps, beta_start, beta_end, scale_with_timesteps=False):
    # Ho et al. 2020, §4: β linear from 1e-4 to 0.02 over T = 1000. Improved DDPM (Nichol & Dhariwal 2021)
    # scales both ends by 1000/T so that other T keep the same ᾱ curve.
    if scale_with_timesteps:
        scale = 1000.0 / timesteps
        beta_start, beta_end = beta_start * scale, beta_end * scale
        if beta_end > 1:
            raise ValueError(f"the linear schedule scaled to {timesteps} timesteps would need beta_end = "
                             f"{beta_end:.3g} > 1; use more timesteps or another schedule")
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def _quad(timesteps, beta_start, beta_end):
    # The original DDPM code's 'quad' (diffusers' 'scaled_linear'): √β linear, then squared.
    return torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2


def _sigmoid(timesteps, beta_start, beta_end):
    # β-space sigmoid (GeoDiff; diffusers' 'sigmoid'): σ(linspace(−6, 6, T)) rescaled to [β_start, β_end].
    return (torch.sigmoid(torch.linspace(-6, 6, timesteps, dtype=torch.float64)) * (beta_end - beta_start)
            + beta_start)


def _betas_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    # alpha_bar holds ᾱ at T + 1 points s = 0 … T; β_t = 1 − ᾱ_t / ᾱ_{t−1}, clipped at 0.999 to avoid
    # the singularity at the end (Nichol & Dhariwal 2021, §3.2).
    alpha_bar = alpha_bar / alpha_bar[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0, 0.999)


def _cosine(timesteps, beta_start, beta_end, s=0.008):
    # Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = cos²(((t/T + s) / (1 + s)) · π/2).
    steps = torch.linspace(0, 1, timesteps + 1, dtype=torch.float64)
    return _betas_from_alpha_bar(torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2)


def _sigmoid_alpha_bar(timesteps, beta_start, beta_end, start=-3.0, end=3.0, tau=1.0):
    # Chen 2023 (arXiv 2212.11972), ᾱ-space sigmoid; denoising-diffusion-pytorch calls this 'sigmoid'.
    if not tau > 0:
        raise ValueError(f"sigmoid_alpha_bar: tau (the sigmoid's temperature) must be > 0, got {tau!r}")
    if not start < end:
        raise ValueError(f"sigmoid_alpha_bar: need start < end, got start={start!r}, end={end!r}")
    steps = torch.linspace(0, 1, timesteps + 1, dtype=torch.float64)
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    alpha_bar = (v_end - torch.sigmoid((steps * (end - start) + start) / tau)) / (v_end - v_start)
    return _betas_from_alpha_bar(alpha_bar)


def _const(timesteps, beta_start, beta_end):
    return torch.full((timesteps,), beta_end, dtype=torch.float64)


def _jsd(timesteps, beta_start, beta_end):
    # Sohl-Dickstein et al. 2015: β = 1/T, 1/(T−1), …, 1. The last step reaches ᾱ = 0 (zero terminal SNR).
    return 1.0 / torch.linspace(timesteps, 1, timesteps, dtype=torch.float64)


def _warmup(fraction):
    # The original DDPM code's 'warmup10' / 'warmup50': linear from β_start to β_end over the first
    # fraction of the steps, then constant β_end.
    def schedule(timesteps, beta_start, beta_end):
        betas = torch.full((timesteps,), beta_end, dtype=torch.float64)
        warmup = int(timesteps * fraction)
        betas[:warmup] = torch.linspace(beta_start, beta_end, warmup, dtype=torch.float64)
        return betas

    return schedule


BETA_SCHEDULES = {
    "linear": _linear,
    "quad": _quad,
    "sigmoid": _sigmoid,
    "sigmoid_alpha_bar": _sigmoid_alpha_bar,
    "cosine": _cosine,
    "const": _const,
    "jsd": _jsd,
    "warmup10": _warmup(0.1),
    "warmup50": _warmup(0.5),
}


def _check_betas(betas: torch.Tensor) -> torch.Tensor:
    if betas.dim() != 1 or betas.numel() < 1:
        raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
    if not torch.isfinite(betas).all():
        raise ValueError("betas contain NaN or Inf")
    if (betas <= 0).any() or (betas > 1).any():
        bad = betas[(betas <= 0) | (betas > 1)][0].item()
        raise ValueError(f"every beta must lie in (0, 1]; found {bad!r}")
    return betas


def get_beta_schedule(
    name: str | Sequence[float] | torch.Tensor,
    timesteps: int | None = None,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    **options,
) -> torch.Tensor:
    """The β_t of a named schedule (float64, shape [timesteps]).

    ``name`` is one of :data:`BETA_SCHEDULES` or a sequence/tensor of betas given by the user (then
    ``timesteps``, when given, must equal its length). ``options`` go to the schedule:
    ``scale_with_timesteps`` (linear), ``s`` (cosine), ``start``/``end``/``tau`` (sigmoid_alpha_bar).
    """
    if not isinstance(name, str):
        betas = torch.as_tensor(name, dtype=torch.float64).detach().cpu().clone()
        if timesteps is not None and betas.dim() == 1 and betas.numel() != timesteps:
            raise ValueError(f"{betas.numel()} betas given but timesteps={timesteps}")
        if options:
            raise TypeError(f"options {sorted(options)} do not apply to user-given betas")
        return _check_betas(betas)
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps must be an integer >= 1, got {timesteps!r}")
    if not 0 < beta_start <= beta_end <= 1:
        raise ValueError(f"need 0 < beta_start <= beta_end <= 1, got beta_start={beta_start}, "
                         f"beta_end={beta_end}")
    try:
        betas = BETA_SCHEDULES[name](timesteps, beta_start, beta_end, **options)
    except TypeError as e:
        raise TypeError(f"beta schedule {name!r} got unexpected options {sorted(options)}") from e
    return _check_betas(betas)


def reverse_table(alphas_cumprod, coef_x0, coef_xt, sigma) -> torch.Tensor:
    """Stack the per-t coefficients of a reverse step into the [REVERSE_TABLE_ROWS, T] table the fused kernels
    read, its rows in the order of :data:`fastddpm.contracts.REVERSE_TABLE`.

    Rows: √(1/ᾱ_t), √(1/ᾱ_t − 1), √ᾱ_t, √(1 − ᾱ_t) (x̂_0 from ε or v), the posterior-mean coefficients
    ``coef_x0`` of x̂_0 and ``coef_xt`` of x_t, and ``sigma`` σ_t. Pass float64 and cast the result: the
    kernels compute nothing of this themselves.
    """
    ac = torch.as_tensor(alphas_cumprod)
    rows = {"sqrt_recip_alphas_cumprod": ac.rsqrt(), "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
            "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
            "posterior_mean_coef1": torch.as_tensor(coef_x0),
            "posterior_mean_coef2": torch.as_tensor(coef_xt), "sigma": torch.as_tensor(sigma)}
    return torch.stack([rows[name] for name in contracts.REVERSE_TABLE])


class NoiseSchedule(nn.Module):
    """Every table DDPM needs, computed in float64 from β and stored as buffers (float32 by default).

    The buffers are not persistent: they are derived from the schedule, so a state_dict holds only the
    network's weights. Index t ∈ [0, T) is the paper's step t + 1.
    """

    TABLES = (
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "snr",
    )
    # Stacked per-t coefficients the fused reverse-step kernels read (kernels/reverse_step.py), one per
    # variance choice, [7, T], rows contracts.REVERSE_TABLE (reverse_table).
    KERNEL_TABLES = ("reverse_table_fixed_small", "reverse_table_fixed_large")

    def __init__(self, betas: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        b = _check_betas(torch.as_tensor(betas, dtype=torch.float64).detach().cpu())
        alphas = 1 - b
        ac = torch.cumprod(alphas, 0)  # ᾱ_t
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])  # ᾱ_{t−1}, with ᾱ_0 = 1
        # Posterior q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I), eq. 6–7:
        #   β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t
        #   μ̃_t = √ᾱ_{t−1} β_t / (1 − ᾱ_t) · x_0 + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · x_t
        post_var = b * (1 - ac_prev) / (1 - ac)
        # β̃ is 0 at the first step; the log is clipped there to β̃ of the second step, as in the DDPM code.
        clip_from = post_var[1] if len(b) > 1 else b[0]
        tables = {
            "betas": b,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
            "log_one_minus_alphas_cumprod": torch.log1p(-ac),
            "sqrt_recip_alphas_cumprod": ac.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": torch.cat([clip_from.reshape(1), post_var[1:]]).log(),
            "posterior_mean_coef1": b * ac_prev.sqrt() / (1 - ac),
            "posterior_mean_coef2": (1 - ac_prev) * alphas.sqrt() / (1 - ac),
            "snr": ac / (1 - ac),  # signal-to-noise ratio ᾱ / (1 − ᾱ)
        }
        for variance, var in (("fixed_small", post_var), ("fixed_large", b)):
            tables[f"reverse_table_{variance}"] = reverse_table(
                ac, tables["posterior_mean_coef1"], tables["posterior_mean_coef2"], var.sqrt())
        for name in self.TABLES + self.KERNEL_TABLES:
            self.register_buffer(name, tables[name].to(dtype), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def zero_terminal_snr(self) -> bool:
        """True when ᾱ reaches 0 at the last step (e.g. 'jsd'): x_0 cannot be recovered from ε there."""
        return bool(self.alphas_cumprod[-1] == 0)

    def _apply(self, fn, recurse=True):
        # The tables stay at least float32 whatever the module is cast to (model.half(), .to(torch.bfloat16)):
        # a cast below float32 keeps the old values and only follows the device.
        before = {name: getattr(self, name) for name in self.TABLES + self.KERNEL_TABLES}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype in (torch.float16, torch.bfloat16):
                setattr(self, name, old.to(new.device))
        return self

    def reverse_table(self, variance: str = "fixed_small") -> torch.Tensor:
        """The [7, T] coefficient table of the fused ancestral step for σ_t² = β̃_t or β_t."""
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"unknown variance {variance!r}; choose fixed_small or fixed_large")
        return getattr(self, f"reverse_table_{variance}")

    def extra_repr(self) -> str:
        return f"timesteps={self.num_timesteps}"
