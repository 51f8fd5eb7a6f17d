"""Pure-PyTorch math of DDPM (Ho, Jain, Abbeel 2020): the ground truth every kernel is tested against.

Every function takes per-sample timesteps ``t`` (int64, shape [B]) and a ``schedule`` holding the
tables of :class:`fastddpm.schedules.NoiseSchedule` (any object with those attributes). Math runs in
the promoted dtype of the input and float32 (float64 stays float64, fp16/bf16 compute in fp32), and the
result comes back in the input's dtype. This module imports no kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastddpm import contracts

OBJECTIVES = contracts.OBJECTIVES
VARIANCES = ("fixed_small", "fixed_large")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def at_timesteps(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """table[t] with t clamped into [0, T), as the Triton kernels read their tables: a t outside the schedule
    (which callers check, unless told not to) reads its nearest end and never wraps: t = −1 is not T − 1."""
    return table[t.clamp(0, table.shape[0] - 1)]


def extract(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """table[t] (t clamped, see :func:`at_timesteps`) shaped [B, 1, ..., 1] to broadcast against x, in x's
    compute dtype."""
    return at_timesteps(table, t).to(_compute_dtype(x.dtype)).reshape(t.shape[0], *((1,) * (x.dim() - 1)))


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5):
    """y = SiLU(GroupNorm(x)): the U-Net's normalisation + activation pair, unfused."""
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def _out(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return y.to(like.dtype)


# ----------------------------------------------------------------------------- counter-based noise
_M32 = 0xFFFFFFFF


def _mulhilo32(a: torch.Tensor, b: int):
    """High and low 32 bits of a·b for uint32 values held in int64 (split in 16-bit halves: no overflow)."""
    p1, p0 = (a >> 16) * b, (a & 0xFFFF) * b
    return (p1 + (p0 >> 16)) >> 16, (((p1 & 0xFFFF) << 16) + p0) & _M32


def philox4x32(seed: int, counter: torch.Tensor, rounds: int = 10):
    """Philox 4×32 (Salmon et al. 2011) of the 64-bit ``counter`` (int64) under the 64-bit key ``seed``.

    Same convention as Triton's ``tl.randint4x``: counter words (lo, hi, 0, 0), key words (seed lo, seed hi).
    Returns the four uint32 outputs held in int64 tensors.
    """
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(c2, 0xCD9E8D57)
        hi_a, lo_a = _mulhilo32(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 → float32 in [0, 1) as Triton's ``uint_to_uniform_float``: fold the sign of the int32 view."""
    v = torch.where(x >= 2**31, x - 2**32, x)
    v = torch.where(v < 0, -v - 1, v)
    return v.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def philox_normal(seed: int, offset: int, batch: int, per_sample: int, device=None) -> torch.Tensor:
    """The noise the fused kernels draw for (seed, offset): float32 [batch, per_sample].

    Element i of sample b is lane i % 4 of ``tl.randn4x(seed, contracts.philox_counter(offset, b, N, i))``:
    Philox 4×32-10, each output mapped to [0, 1), and Box–Muller on the pairs (lanes 0, 1) and (2, 3).
    """
    rows = contracts.counters_per_sample(per_sample)
    counter = offset + torch.arange(batch * rows, dtype=torch.int64, device=device)  # b·rows + i // 4
    u = [_uniform(r) for r in philox4x32(int(seed), counter)]
    lanes = []
    for u1, u2 in ((u[0], u[1]), (u[2], u[3])):
        radius = torch.sqrt(-2.0 * torch.log(u1.clamp(min=1e-7)))
        theta = 6.283185307179586 * u2
        lanes += [radius * torch.cos(theta), radius * torch.sin(theta)]
    return torch.stack(lanes, dim=1).reshape(batch, rows * contracts.PHILOX_LANES)[:, :per_sample]


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


def dynamic_threshold(x0, ratio=0.995, max_value=1.0):
    """Dynamic thresholding (Saharia et al. 2022, as diffusers' ``thresholding``): per sample, s = the
    ``ratio`` quantile of |x̂_0| clamped to [1, max_value]; x̂_0 → clamp(x̂_0, −s, s) / s. Returns (x̂_0, s)."""
    s = torch.quantile(x0.abs().flatten(1).float(), ratio, dim=1).clamp(1.0, max_value).to(x0.dtype)
    s_ = s.reshape(-1, *((1,) * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, s_), -s_) / s_, s


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
    snr = at_timesteps(schedule.snr, t).to(torch.promote_types(schedule.snr.dtype, torch.float32))
    if min_snr_gamma is None:
        return torch.ones_like(snr)
    if not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0 (or None), got {min_snr_gamma}")
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
def _limit_x0(x0, clip, threshold):
    """x̂_0 after dynamic thresholding or clipping to ±clip. ``threshold`` is (ratio, max_value), or the
    per-sample scales s [B] themselves."""
    if isinstance(threshold, torch.Tensor):
        s = threshold.to(x0.dtype).reshape(-1, *((1,) * (x0.dim() - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s
    if threshold is not None:
        return dynamic_threshold(x0, *threshold)[0]
    if clip is not None and clip is not False:
        bound = 1.0 if clip is True else float(clip)
        return x0.clamp(-bound, bound)
    return x0


def p_sample_step(schedule, model_output, x_t, t, noise, objective="pred_noise", variance="fixed_small",
                  clip_denoised=True, threshold=None):
    """One ancestral step x_t → x_{t−1} (Algorithm 2): x_{t−1} = μ̃_t(x_t, x̂_0) + σ_t z, no noise at t = 0.

    σ_t² is β̃_t ('fixed_small') or β_t ('fixed_large'), the paper's two choices (§3.2). x̂_0 is clipped to
    [−1, 1] (``clip_denoised=True``), to ±c (a number), or dynamically thresholded (``threshold`` =
    (ratio, max_value)). Returns (x_{t−1}, x̂_0) in x_t's dtype.
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    cd = _compute_dtype(x_t.dtype)
    x = x_t.to(cd)
    _, x0 = model_predictions(schedule, model_output, x, t, objective)
    x0 = _limit_x0(x0, clip_denoised, threshold)
    mean, post_var, _ = q_posterior(schedule, x0, x, t)
    var = post_var if variance == "fixed_small" else extract(schedule.betas, t, x)
    nonzero = (t > 0).to(cd).reshape(-1, *((1,) * (x.dim() - 1)))
    x_prev = mean + nonzero * var.sqrt() * noise.to(cd)
    return _out(x_prev, x_t), _out(x0, x_t)


def ddim_step(schedule, model_output, x_t, t, t_prev, noise, objective="pred_noise", eta=0.0,
              clip_denoised=True, threshold=None, rederive_noise=True, final_alpha_cumprod=1.0):
    """One DDIM step x_t → x_{t_prev} (Song et al. 2021, eq. 12); t_prev < 0 means the end, where
    ᾱ_prev = ``final_alpha_cumprod`` (1: the clean image).

    x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z,  σ = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev).
    x̂_0 is clipped or thresholded as in :func:`p_sample_step`; with ``rederive_noise`` ε̂ is then recomputed
    from the limited x̂_0 (diffusers' ``use_clipped_model_output``). With η = 1 and t_prev = t − 1 this is the
    ancestral step with σ² = β̃_t.
    """
    cd = _compute_dtype(x_t.dtype)
    x = x_t.to(cd)
    eps, x0 = model_predictions(schedule, model_output, x, t, objective)
    limited = _limit_x0(x0, clip_denoised, threshold)
    if rederive_noise and limited is not x0:
        eps = predict_noise_from_start(schedule, x, t, limited)
    x0 = limited
    ac = extract(schedule.alphas_cumprod, t, x)
    if not 0 <= final_alpha_cumprod <= 1:
        raise ValueError(f"final_alpha_cumprod (ᾱ after the last step) must lie in [0, 1], "
                         f"got {final_alpha_cumprod}")
    # (torch.full fills on the device; torch.tensor of a Python float on CUDA copies from the host and syncs)
    ac_prev = torch.where(t_prev >= 0, at_timesteps(schedule.alphas_cumprod, t_prev).to(cd),
                          torch.full((), final_alpha_cumprod, dtype=cd, device=x.device))
    ac_prev = ac_prev.reshape(ac.shape)
    sigma = eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)).clamp(min=0).sqrt()
    direction = (1 - ac_prev - sigma**2).clamp(min=0).sqrt() * eps
    x_prev = ac_prev.sqrt() * x0 + direction + sigma * noise.to(cd)
    return _out(x_prev, x_t), _out(x0, x_t)
