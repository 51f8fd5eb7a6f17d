"""The training loss L = w_b · mean_i (pred − target)² (DDPM eq. 14, L_simple), forward and backward.

The target is formed in-kernel from what the objective needs: ε (given, or regenerated from the same
(seed, offset) that q_sample drew it with, so ε never goes to memory), x_0, or v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0.
The optional per-sample weight is min-SNR-γ, computed in-kernel from SNR_t = ᾱ_t / (1 − ᾱ_t).

Forward: one read of pred (and x_0 where the target needs it) → per-(sample, chunk) partial sums, then a
one-program finalize kernel sums them in a fixed order (deterministic, no atomics) into per-sample losses
and their mean. Backward recomputes the target and writes ∂L/∂pred in one sweep; this moves fewer bytes than
storing ∂L/∂pred in the forward (which costs a write there plus a read-scale-write in the backward).
"""

import triton
import triton.language as tl

from fastddpm import contracts

from .common import compute_dtype, grid, num_warps, pow2_at_least, sample_tile, tile_rows
from .noise import normal_rows

PRED_NOISE = tl.constexpr(contracts.PRED_NOISE)
PRED_X0 = tl.constexpr(contracts.PRED_X0)
REDUCTION_NONE = tl.constexpr(contracts.REDUCTION_NONE)
PHILOX_LANES = tl.constexpr(contracts.PHILOX_LANES)


@triton.jit
def _target(x0_ptr, noise_ptr, seed_ptr, b, base, rows, i, mask, a, s, offset, N,
            OBJECTIVE: tl.constexpr, HAS_NOISE: tl.constexpr, CD: tl.constexpr):
    if OBJECTIVE != PRED_X0:  # ε is part of the target (pred_noise, pred_v)
        if HAS_NOISE:
            eps = tl.load(noise_ptr + base + i, mask=mask).to(CD)
        else:
            # contracts.philox_counter: row r of sample b is counter offset + b·⌈N/PHILOX_LANES⌉ + r
            counter = offset + b * ((N + PHILOX_LANES - 1) // PHILOX_LANES) + rows
            eps = normal_rows(tl.load(seed_ptr), counter).to(CD)
    if OBJECTIVE == PRED_NOISE:
        target = eps
    else:
        x0 = tl.load(x0_ptr + base + i, mask=mask).to(CD)
        if OBJECTIVE == PRED_X0:
            target = x0
        else:
            target = a * eps - s * x0
    return target


@triton.jit
def _weight(a, s, gamma, OBJECTIVE: tl.constexpr, HAS_GAMMA: tl.constexpr):
    """min-SNR-γ on the objective's scale: ε → min(SNR, γ)/SNR, x_0 → min(SNR, γ),
    v → min(SNR, γ)/(SNR + 1)."""
    if HAS_GAMMA:
        snr = (a * a) / (s * s)
        clipped = tl.minimum(snr, gamma)
        if OBJECTIVE == PRED_NOISE:
            w = clipped / snr
        elif OBJECTIVE == PRED_X0:
            w = clipped
        else:
            w = clipped / (snr + 1.0)
    else:
        w = a * 0.0 + 1.0
    return w


@triton.jit
def loss_partial_kernel(pred_ptr, x0_ptr, noise_ptr, t_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, seed_ptr,
                        partial_ptr, offset, N, T, n_chunks,
                        OBJECTIVE: tl.constexpr, HAS_NOISE: tl.constexpr, CD: tl.constexpr,
                        ROWS: tl.constexpr):
    b, rows, i, mask, base, t = sample_tile(t_ptr, N, T, ROWS)
    chunk = tl.program_id(1)
    a = tl.load(sqrt_ac_ptr + t).to(CD)
    s = tl.load(sqrt_1m_ac_ptr + t).to(CD)
    target = _target(x0_ptr, noise_ptr, seed_ptr, b, base, rows, i, mask, a, s, offset, N, OBJECTIVE,
                     HAS_NOISE, CD)
    d = tl.load(pred_ptr + base + i, mask=mask).to(CD) - target
    d = tl.where(mask, d, 0.0)
    tl.store(partial_ptr + b * n_chunks + chunk, tl.sum(tl.sum(d * d, axis=1), axis=0))


@triton.jit
def loss_finalize_kernel(partial_ptr, t_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, loss_ptr, mean_ptr, B, N, T,
                         n_chunks, gamma, OBJECTIVE: tl.constexpr, HAS_GAMMA: tl.constexpr, CD: tl.constexpr,
                         BLOCK_B: tl.constexpr):
    """loss[b] = w_b · Σ_c partial[b, c] / N, and mean = Σ_b loss[b] / B, summed in a fixed order."""
    total = tl.zeros([BLOCK_B], dtype=CD)
    for start in range(0, B, BLOCK_B):
        b = start + tl.arange(0, BLOCK_B)
        bmask = b < B
        acc = tl.zeros([BLOCK_B], dtype=CD)
        for c in range(0, n_chunks):
            acc += tl.load(partial_ptr + b.to(tl.int64) * n_chunks + c, mask=bmask, other=0.0)
        t = tl.minimum(tl.maximum(tl.load(t_ptr + b, mask=bmask, other=0), 0), T - 1)
        a = tl.load(sqrt_ac_ptr + t).to(CD)
        s = tl.load(sqrt_1m_ac_ptr + t).to(CD)
        per_sample = _weight(a, s, gamma, OBJECTIVE, HAS_GAMMA) * acc / N
        per_sample = tl.where(bmask, per_sample, 0.0)
        tl.store(loss_ptr + b, per_sample, mask=bmask)
        total += per_sample
    tl.store(mean_ptr, tl.sum(total, axis=0) / B)


@triton.jit
def loss_backward_kernel(grad_ptr, pred_ptr, x0_ptr, noise_ptr, t_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, seed_ptr,
                         grad_pred_ptr, offset, N, T, B, gamma,
                         OBJECTIVE: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_GAMMA: tl.constexpr,
                         REDUCTION: tl.constexpr, CD: tl.constexpr, ROWS: tl.constexpr):
    """∂L/∂pred = g_b · w_b · 2 (pred − target) / N, with g_b = grad[b] ('none') or grad / B ('mean')."""
    b, rows, i, mask, base, t = sample_tile(t_ptr, N, T, ROWS)
    a = tl.load(sqrt_ac_ptr + t).to(CD)
    s = tl.load(sqrt_1m_ac_ptr + t).to(CD)
    if REDUCTION == REDUCTION_NONE:
        g = tl.load(grad_ptr + b).to(CD)
    else:
        g = tl.load(grad_ptr).to(CD) / B
    scale = g * _weight(a, s, gamma, OBJECTIVE, HAS_GAMMA) * 2.0 / N
    target = _target(x0_ptr, noise_ptr, seed_ptr, b, base, rows, i, mask, a, s, offset, N, OBJECTIVE,
                     HAS_NOISE, CD)
    d = tl.load(pred_ptr + base + i, mask=mask).to(CD) - target
    tl.store(grad_pred_ptr + base + i, (scale * d).to(grad_pred_ptr.dtype.element_ty), mask=mask)


def _common(pred, x_start, noise, seed, t):
    dummy = pred
    return (x_start if x_start is not None else dummy, noise if noise is not None else dummy,
            seed if seed is not None else t)


def launch_loss(pred, x_start, t, sqrt_ac, sqrt_1m_ac, partial, per_sample_loss, mean, *, objective,
                noise=None, seed=None, offset=0, min_snr_gamma=None, wrap=lambda kernel: kernel):
    """Fills per_sample_loss [B] and mean [] (compute dtype); partial is a [B, chunks] workspace."""
    batch = pred.shape[0]
    per_sample = pred.numel() // batch
    rows = tile_rows(per_sample)
    g = grid(batch, per_sample, rows)
    x0, eps, seed = _common(pred, x_start, noise, seed, t)
    cd = compute_dtype(pred.dtype)
    wrap(loss_partial_kernel)[g](pred, x0, eps, t, sqrt_ac, sqrt_1m_ac, seed, partial, offset, per_sample,
                                 sqrt_ac.shape[0], g[1], OBJECTIVE=objective, HAS_NOISE=noise is not None,
                                 CD=cd, ROWS=rows, num_warps=num_warps(rows))
    wrap(loss_finalize_kernel)[(1,)](partial, t, sqrt_ac, sqrt_1m_ac, per_sample_loss, mean, batch,
                                     per_sample, sqrt_ac.shape[0], g[1],
                                     0.0 if min_snr_gamma is None else min_snr_gamma,
                                     OBJECTIVE=objective, HAS_GAMMA=min_snr_gamma is not None, CD=cd,
                                     BLOCK_B=pow2_at_least(batch, 1024), num_warps=4)


def chunks(pred) -> int:
    batch = pred.shape[0]
    per_sample = pred.numel() // batch
    return grid(batch, per_sample, tile_rows(per_sample))[1]


def launch_loss_backward(grad, pred, x_start, t, sqrt_ac, sqrt_1m_ac, grad_pred, *, objective, reduction,
                         noise=None, seed=None, offset=0, min_snr_gamma=None, wrap=lambda kernel: kernel):
    batch = pred.shape[0]
    per_sample = pred.numel() // batch
    rows = tile_rows(per_sample)
    x0, eps, seed = _common(pred, x_start, noise, seed, t)
    wrap(loss_backward_kernel)[grid(batch, per_sample, rows)](
        grad, pred, x0, eps, t, sqrt_ac, sqrt_1m_ac, seed, grad_pred, offset, per_sample, sqrt_ac.shape[0],
        batch, 0.0 if min_snr_gamma is None else min_snr_gamma, OBJECTIVE=objective,
        HAS_NOISE=noise is not None, HAS_GAMMA=min_snr_gamma is not None, REDUCTION=reduction,
        CD=compute_dtype(pred.dtype), ROWS=rows, num_warps=num_warps(rows))
    return grad_pred
