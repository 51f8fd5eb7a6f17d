"""Pure-PyTorch math of DDPM (Ho, Jain, Abbeel 2020): the ground truth every kernel is tested against.

Every function takes per-sample timesteps ``t`` (int64, shape [B]) and a ``schedule`` holding the
tables of :class:`fastddpm.schedules.NoiseSchedule` (any object with those attributes). Math runs in
the promoted dtype of the input and float32 (float64 stays float64, fp16/bf16 compute in fp32), and the
result comes back in the input's dtype. This module imports no kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")
VARIANCES = ("fixed_small", "fixed_large")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def extract(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """table[t] shaped [B, 1, ..., 1] to broadcast against x, in x's compute dtype."""
    return table[t].to(_compute_dtype(x.dtype)).reshape(t.shape[0], *((1,) * (x.dim() - 1)))


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5):
    """y = SiLU(GroupNorm(x)): the U-Net's normalisation + activation pair, unfused."""
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def _out(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return y.to(like.dtype)


# ----------------------------------------------------------------------------- forward process
def q_sample(schedule, x_start, t, noise):
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (eq. 4, reparameterised)."""
    x0, eps = x_start.to(_compute_dtype(x_start.dtype)), noise.to(_compute_dtype(x_start.dtype))
    return _out(extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
                + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * eps, x_start)


def predict_start_from_noise(schedule, x_t, t, noise):
    """x̂_0 = √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε (eq. 4 solved for x_0)."""
    return extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - extract(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * noise


def predict_noise_from_start(schedule, x_t, t, x_start):
    """ε = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t) (eq. 4 solved for ε; finite also where ᾱ_t = 0)."""
    return (x_t - extract(schedule.sqrt_alphas_cumprod, t, x_t) * x_start) / extract(
        schedule.sqrt_one_minus_alphas_cumprod, t, x_t)


def predict_v(schedule, x_start, t, noise):
    """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022, §4)."""
    return extract(schedule.sqrt_alphas_cumprod, t, x_start) * noise - extract(
        schedule.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start


def predict_start_from_v(schedule, x_t, t, v):
    """x̂_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v."""
    return extract(schedule.sqrt_alphas_cumprod, t, x_t) * x_t - extract(
        schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v


def predict_noise_from_v(schedule, x_t, t, v):
    """ε̂ = √(1 − ᾱ_t) x_t + √ᾱ_t v."""
    return extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t + extract(
        schedule.sqrt_alphas_cumprod, t, x_t) * v


def model_predictions(schedule, model_output, x_t, t, objective="pred_noise", clip_denoised=False,
                      rederive_noise=False):
    """(ε̂, x̂_0) from the network's output for the given objective, in the compute dtype.

    With ``clip_denoised`` x̂_0 is clipped to [−1, 1]; with ``rederive_noise`` too, ε̂ is recomputed
    from the clipped x̂_0 (what DDIM sampling uses, so that its update stays consistent).
    """
    cd = _compute_dtype(x_t.dtype)
    out, x = model_output.to(cd), x_t.to(cd)
    if objective == "pred_noise":
        eps, x0 = out, predict_start_from_noise(schedule, x, t, out)
    elif objective == "pred_x0":
        x0 = out
        eps = predict_noise_from_start(schedule, x, t, x0)
    elif objective == "pred_v":
        x0, eps = predict_start_from_v(schedule, x, t, out), predict_noise_from_v(schedule, x, t, out)
    else:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        if rederive_noise:
            eps = predict_noise_from_start(schedule, x, t, x0)
    return eps, x0


def q_posterior(schedule, x_start, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x_0) (eq. 6–7)."""
    mean = extract(schedule.posterior_mean_coef1, t, x_t) * x_start + extract(
        schedule.posterior_mean_coef2, t, x_t) * x_t
    return (mean, extract(schedule.posterior_variance, t, x_t),
            extract(schedule.posterior_log_variance_clipped, t, x_t))


# ----------------------------------------------------------------------------- training loss
def loss_target(schedule, objective, x_start, t, noise):
    """What the network is trained to predict: ε, x_0 or v."""
    if objective == "pred_noise":
        return noise
    if objective == "pred_x0":
        return x_start
    if objective == "pred_v":
        return predict_v(schedule, x_start, t, noise)
    raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def loss_weight(schedule, objective, t, min_snr_gamma=None):
    """Per-sample weight [B] of the MSE: 1, or min-SNR-γ (Hang et al. 2023) when ``min_snr_gamma`` is set.

    min-SNR-γ weights the ε-loss by min(SNR, γ)/SNR; expressed on the x_0 target that is min(SNR, γ), and
    on the v target min(SNR, γ)/(SNR + 1), so that all three objectives get the same effective weight.
    """
    snr = schedule.snr[t].to(torch.promote_types(schedule.snr.dtype, torch.float32))
    if min_snr_gamma is None:
        return torch.ones_like(snr)
    clipped = snr.clamp(max=float(min_snr_gamma))
    if objective == "pred_noise":
        return clipped / snr
    if objective == "pred_x0":
        return clipped
    if objective == "pred_v":
        return clipped / (snr + 1)
    raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def diffusion_loss(schedule, model_output, x_start, t, noise, objective="pred_noise", min_snr_gamma=None,
                   reduction="mean"):
    """L_simple (eq. 14) for the objective: per-sample mean of (output − target)², optionally weighted.

    ``reduction='none'`` returns the per-sample losses [B] (for importance sampling of t), 'mean' their mean.
    The loss is computed and returned in float32 (float64 for float64 inputs).
    """
    cd = _compute_dtype(model_output.dtype)
    target = loss_target(schedule, objective, x_start.to(cd), t, noise.to(cd))
    per_sample = (model_output.to(cd) - target).pow(2).flatten(1).mean(1)
    per_sample = per_sample * loss_weight(schedule, objective, t, min_snr_gamma).to(cd)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------- reverse process
def p_sample_step(schedule, model_output, x_t, t, noise, objective="pred_noise", variance="fixed_small",
                  clip_denoised=True):
    """One ancestral step x_t → x_{t−1} (Algorithm 2): x_{t−1} = μ̃_t(x_t, x̂_0) + σ_t z, no noise at t = 0.

    σ_t² is β̃_t ('fixed_small') or β_t ('fixed_large'), the paper's two choices (§3.2).
    Returns (x_{t−1}, x̂_0) in x_t's dtype.
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    cd = _compute_dtype(x_t.dtype)
    x = x_t.to(cd)
    _, x0 = model_predictions(schedule, model_output, x, t, objective, clip_denoised)
    mean, post_var, _ = q_posterior(schedule, x0, x, t)
    var = post_var if variance == "fixed_small" else extract(schedule.betas, t, x)
    nonzero = (t > 0).to(cd).reshape(-1, *((1,) * (x.dim() - 1)))
    x_prev = mean + nonzero * var.sqrt() * noise.to(cd)
    return _out(x_prev, x_t), _out(x0, x_t)


def ddim_step(schedule, model_output, x_t, t, t_prev, noise, objective="pred_noise", eta=0.0,
              clip_denoised=True):
    """One DDIM step x_t → x_{t_prev} (Song et al. 2021, eq. 12); t_prev < 0 means the end (ᾱ = 1).

    x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z,  σ = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev).
    With η = 1 and t_prev = t − 1 this is the ancestral step with σ² = β̃_t.
    """
    cd = _compute_dtype(x_t.dtype)
    x = x_t.to(cd)
    eps, x0 = model_predictions(schedule, model_output, x, t, objective, clip_denoised, rederive_noise=True)
    ac = extract(schedule.alphas_cumprod, t, x)
    ac_prev = torch.where(t_prev >= 0, schedule.alphas_cumprod[t_prev.clamp(min=0)].to(cd), 1.0)
    ac_prev = ac_prev.reshape(ac.shape)
    sigma = eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)).clamp(min=0).sqrt()
    direction = (1 - ac_prev - sigma**2).clamp(min=0).sqrt() * eps
    x_prev = ac_prev.sqrt() * x0 + direction + sigma * noise.to(cd)
    return _out(x_prev, x_t), _out(x0, x_t)
