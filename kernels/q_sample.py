"""Forward noising x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (DDPM eq. 4), ε given or drawn in-kernel.

Reads x_0 (and ε when given), writes x_t (and ε when asked): the fewest bytes the math allows.
"""

import triton
import triton.language as tl

from .common import compute_dtype, grid, num_warps, sample_tile, tile_rows
from .noise import normal_rows, sample_counters


@triton.jit
def q_sample_kernel(x_ptr, noise_ptr, out_ptr, noise_out_ptr, t_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, seed_ptr,
                    offset, N, T,
                    HAS_NOISE: tl.constexpr, WRITE_NOISE: tl.constexpr, CD: tl.constexpr, ROWS: tl.constexpr):
    b, rows, i, mask, base, t = sample_tile(t_ptr, N, T, ROWS)
    a = tl.load(sqrt_ac_ptr + t).to(CD)
    s = tl.load(sqrt_1m_ac_ptr + t).to(CD)
    x = tl.load(x_ptr + base + i, mask=mask).to(CD)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + base + i, mask=mask).to(CD)
    else:
        eps = normal_rows(tl.load(seed_ptr), sample_counters(offset, b, N, rows)).to(CD)
        if WRITE_NOISE:
            tl.store(noise_out_ptr + base + i, eps.to(noise_out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + base + i, (a * x + s * eps).to(out_ptr.dtype.element_ty), mask=mask)


def launch_q_sample(x, t, sqrt_ac, sqrt_1m_ac, out, *, noise=None, seed=None, offset=0, noise_out=None,
                    wrap=lambda kernel: kernel):
    """x, out (and noise, noise_out) dense with batch outermost and equal strides; t int64 [B]."""
    batch = x.shape[0]
    per_sample = x.numel() // batch if batch else 0
    if x.numel() == 0:
        return out
    rows = tile_rows(per_sample)
    wrap(q_sample_kernel)[grid(batch, per_sample, rows)](
        x, noise if noise is not None else x, out, noise_out if noise_out is not None else out, t,
        sqrt_ac, sqrt_1m_ac, seed if seed is not None else t, offset, per_sample, sqrt_ac.shape[0],
        HAS_NOISE=noise is not None, WRITE_NOISE=noise_out is not None, CD=compute_dtype(x.dtype),
        ROWS=rows, num_warps=num_warps(rows))
    return out
