"""Reverse steps x_t → x_{t−1}: the ancestral DDPM update (Algorithm 2) and the DDIM update (Song et al.
eq. 12).

Both read the network's output and x_t once and write x_{t−1} (and, on request, x̂_0 and the noise drawn):
x̂_0 from the output for the objective (ε, x_0 or v), optional clipping to ±clip or a per-sample dynamic
threshold s_b (x̂_0 → clamp(x̂_0, −s_b, s_b)/s_b, s_b computed on the host side from a quantile), then the
update with σ_t·z, z drawn in-kernel from Philox or given, and no noise where t = 0.

The ancestral step reads its per-t coefficients from one stacked float32 table [7, T] whose rows are
fastddpm.contracts.REVERSE_TABLE (√(1/ᾱ_t), √(1/ᾱ_t − 1), √ᾱ_t, √(1 − ᾱ_t), the μ̃ coefficients of x̂_0
and x_t, σ_t), computed in float64 on the host (fastddpm.schedules.NoiseSchedule.reverse_table), so
respaced schedules and both variances are only a different table; the DDIM step reads its first four rows.
"""

import triton
import triton.language as tl

from fastddpm import contracts

from .common import compute_dtype, grid, num_warps, sample_tile, tile_rows
from .noise import normal_rows

# The contracts the kernels read, as compile-time constants (fastddpm/contracts.py).
PRED_NOISE = tl.constexpr(contracts.PRED_NOISE)
PRED_X0 = tl.constexpr(contracts.PRED_X0)
ROW_SQRT_RECIP_AC = tl.constexpr(contracts.ROW_SQRT_RECIP_AC)
ROW_SQRT_RECIPM1_AC = tl.constexpr(contracts.ROW_SQRT_RECIPM1_AC)
ROW_SQRT_AC = tl.constexpr(contracts.ROW_SQRT_AC)
ROW_SQRT_1M_AC = tl.constexpr(contracts.ROW_SQRT_1M_AC)
ROW_POSTERIOR_COEF_X0 = tl.constexpr(contracts.ROW_POSTERIOR_COEF_X0)
ROW_POSTERIOR_COEF_XT = tl.constexpr(contracts.ROW_POSTERIOR_COEF_XT)
ROW_SIGMA = tl.constexpr(contracts.ROW_SIGMA)
PHILOX_LANES = tl.constexpr(contracts.PHILOX_LANES)


@triton.jit
def _x0_coefficients(table_ptr, t, T, CD: tl.constexpr):
    """The x̂_0 rows of the table at t: √(1/ᾱ), √(1/ᾱ − 1), √ᾱ, √(1 − ᾱ)."""
    return (tl.load(table_ptr + ROW_SQRT_RECIP_AC * T + t).to(CD),
            tl.load(table_ptr + ROW_SQRT_RECIPM1_AC * T + t).to(CD),
            tl.load(table_ptr + ROW_SQRT_AC * T + t).to(CD),
            tl.load(table_ptr + ROW_SQRT_1M_AC * T + t).to(CD))


@triton.jit
def _x0_from_output(out, x, r0, r1, r2, r3, OBJECTIVE: tl.constexpr):
    if OBJECTIVE == PRED_NOISE:  # ε: x̂_0 = √(1/ᾱ) x_t − √(1/ᾱ − 1) ε
        x0 = r0 * x - r1 * out
    elif OBJECTIVE == PRED_X0:
        x0 = out
    else:  # v: x̂_0 = √ᾱ x_t − √(1 − ᾱ) v
        x0 = r2 * x - r3 * out
    return x0


@triton.jit
def _limit_x0(x0, scale_ptr, b, clip, HAS_CLIP: tl.constexpr, HAS_THRESHOLD: tl.constexpr, CD: tl.constexpr):
    if HAS_THRESHOLD:
        s = tl.load(scale_ptr + b).to(CD)
        x0 = tl.minimum(tl.maximum(x0, -s), s) / s
    elif HAS_CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip), clip)
    return x0


@triton.jit
def _noise(noise_ptr, noise_out_ptr, seed_ptr, b, base, rows, i, mask, offset, N,
           HAS_NOISE: tl.constexpr, WRITE_NOISE: tl.constexpr, CD: tl.constexpr):
    if HAS_NOISE:
        z = tl.load(noise_ptr + base + i, mask=mask).to(CD)
    else:
        # row r of the tile is one Philox counter: contracts.philox_counter(offset, b, N, PHILOX_LANES·r)
        counters_per_sample = (N + (PHILOX_LANES - 1)) // PHILOX_LANES
        z = normal_rows(tl.load(seed_ptr), offset + b * counters_per_sample + rows).to(CD)
        if WRITE_NOISE:
            tl.store(noise_out_ptr + base + i, z.to(noise_out_ptr.dtype.element_ty), mask=mask)
    return z


@triton.jit
def p_sample_kernel(out_ptr, x_ptr, t_ptr, table_ptr, noise_ptr, seed_ptr, scale_ptr, x_prev_ptr, x0_out_ptr,
                    noise_out_ptr, offset, N, T, clip,
                    OBJECTIVE: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_CLIP: tl.constexpr,
                    HAS_THRESHOLD: tl.constexpr, WRITE_X0: tl.constexpr, WRITE_NOISE: tl.constexpr,
                    CD: tl.constexpr, ROWS: tl.constexpr):
    b, rows, i, mask, base, t = sample_tile(t_ptr, N, T, ROWS)
    r0, r1, r2, r3 = _x0_coefficients(table_ptr, t, T, CD)
    coef_x0 = tl.load(table_ptr + ROW_POSTERIOR_COEF_X0 * T + t).to(CD)
    coef_xt = tl.load(table_ptr + ROW_POSTERIOR_COEF_XT * T + t).to(CD)
    sigma = tl.where(t > 0, tl.load(table_ptr + ROW_SIGMA * T + t).to(CD), 0.0)
    x = tl.load(x_ptr + base + i, mask=mask).to(CD)
    out = tl.load(out_ptr + base + i, mask=mask).to(CD)
    x0 = _limit_x0(_x0_from_output(out, x, r0, r1, r2, r3, OBJECTIVE), scale_ptr, b, clip,
                   HAS_CLIP, HAS_THRESHOLD, CD)
    z = _noise(noise_ptr, noise_out_ptr, seed_ptr, b, base, rows, i, mask, offset, N, HAS_NOISE, WRITE_NOISE,
               CD)
    # x_{t−1} = μ̃_t(x_t, x̂_0) + σ_t z   (eq. 7 and Algorithm 2, line 4)
    x_prev = coef_x0 * x0 + coef_xt * x + sigma * z
    tl.store(x_prev_ptr + base + i, x_prev.to(x_prev_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_out_ptr + base + i, x0.to(x0_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ddim_kernel(out_ptr, x_ptr, t_ptr, t_prev_ptr, table_ptr, ac_ptr, noise_ptr, seed_ptr, scale_ptr,
                x_prev_ptr, x0_out_ptr, noise_out_ptr, offset, N, T, clip, eta, final_alpha_cumprod,
                OBJECTIVE: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_CLIP: tl.constexpr,
                HAS_THRESHOLD: tl.constexpr, REDERIVE: tl.constexpr, WRITE_X0: tl.constexpr,
                WRITE_NOISE: tl.constexpr, STOCHASTIC: tl.constexpr, CD: tl.constexpr, ROWS: tl.constexpr):
    b, rows, i, mask, base, t = sample_tile(t_ptr, N, T, ROWS)
    t_prev = tl.load(t_prev_ptr + b)
    r0, r1, r2, r3 = _x0_coefficients(table_ptr, t, T, CD)
    # Per-sample scalars in float64: σ = η √((1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev)) cancels badly in fp32.
    ac = tl.load(ac_ptr + t).to(tl.float64)
    ac_prev = tl.load(ac_ptr + tl.minimum(tl.maximum(t_prev, 0), T - 1)).to(tl.float64)
    ac_prev = tl.where(t_prev >= 0, ac_prev, final_alpha_cumprod)
    var = (1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev)
    sigma64 = eta * tl.sqrt(tl.maximum(var, 0.0))
    dir64 = tl.sqrt(tl.maximum(1.0 - ac_prev - sigma64 * sigma64, 0.0))
    sigma = sigma64.to(CD)
    coef_dir = dir64.to(CD)
    coef_x0 = tl.sqrt(ac_prev).to(CD)
    x = tl.load(x_ptr + base + i, mask=mask).to(CD)
    out = tl.load(out_ptr + base + i, mask=mask).to(CD)
    raw_x0 = _x0_from_output(out, x, r0, r1, r2, r3, OBJECTIVE)
    x0 = _limit_x0(raw_x0, scale_ptr, b, clip, HAS_CLIP, HAS_THRESHOLD, CD)
    if REDERIVE:  # ε̂ from the (clipped) x̂_0: ε̂ = (x_t − √ᾱ x̂_0) / √(1 − ᾱ)
        eps = (x - r2 * x0) / r3
    elif OBJECTIVE == PRED_NOISE:
        eps = out
    elif OBJECTIVE == PRED_X0:
        eps = (x - r2 * raw_x0) / r3
    else:  # v: ε̂ = √(1 − ᾱ) x_t + √ᾱ v
        eps = r3 * x + r2 * out
    # x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z   (DDIM eq. 12)
    x_prev = coef_x0 * x0 + coef_dir * eps
    if STOCHASTIC:
        z = _noise(noise_ptr, noise_out_ptr, seed_ptr, b, base, rows, i, mask, offset, N, HAS_NOISE,
                   WRITE_NOISE, CD)
        x_prev += sigma * z
    tl.store(x_prev_ptr + base + i, x_prev.to(x_prev_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_out_ptr + base + i, x0.to(x0_out_ptr.dtype.element_ty), mask=mask)


def _launch_args(x):
    batch = x.shape[0]
    per_sample = x.numel() // batch
    rows = tile_rows(per_sample)
    return grid(batch, per_sample, rows), per_sample, rows


def launch_p_sample(out, x, t, table, x_prev, *, objective, noise=None, seed=None, offset=0, clip=None,
                    threshold_scale=None, x0_out=None, noise_out=None, wrap=lambda kernel: kernel):
    g, per_sample, rows = _launch_args(x)
    wrap(p_sample_kernel)[g](
        out, x, t, table, noise if noise is not None else x, seed if seed is not None else t,
        threshold_scale if threshold_scale is not None else table, x_prev,
        x0_out if x0_out is not None else x_prev, noise_out if noise_out is not None else x_prev,
        offset, per_sample, table.shape[1], 1.0 if clip is None else float(clip),
        OBJECTIVE=objective, HAS_NOISE=noise is not None, HAS_CLIP=clip is not None,
        HAS_THRESHOLD=threshold_scale is not None, WRITE_X0=x0_out is not None,
        WRITE_NOISE=noise_out is not None, CD=compute_dtype(x.dtype), ROWS=rows, num_warps=num_warps(rows))
    return x_prev


def launch_ddim(out, x, t, t_prev, table, alphas_cumprod, x_prev, *, objective, eta=0.0,
                final_alpha_cumprod=1.0, rederive_noise=True, noise=None, seed=None, offset=0, clip=None,
                threshold_scale=None, x0_out=None, noise_out=None, wrap=lambda kernel: kernel):
    g, per_sample, rows = _launch_args(x)
    wrap(ddim_kernel)[g](
        out, x, t, t_prev, table, alphas_cumprod, noise if noise is not None else x,
        seed if seed is not None else t, threshold_scale if threshold_scale is not None else table, x_prev,
        x0_out if x0_out is not None else x_prev, noise_out if noise_out is not None else x_prev,
        offset, per_sample, table.shape[1], 1.0 if clip is None else float(clip), float(eta),
        float(final_alpha_cumprod),
        OBJECTIVE=objective, HAS_NOISE=noise is not None, HAS_CLIP=clip is not None,
        HAS_THRESHOLD=threshold_scale is not None, REDERIVE=rederive_noise, WRITE_X0=x0_out is not None,
        WRITE_NOISE=noise_out is not None, STOCHASTIC=eta != 0 or noise_out is not None,
        CD=compute_dtype(x.dtype), ROWS=rows, num_warps=num_warps(rows))
    return x_prev
