"""Launch parameters shared by fastddpm's streaming kernels.

Every streaming kernel runs on a 2-D grid (sample b, chunk of that sample) and processes its chunk as an
[R, 4] tile: row r covers elements 4r..4r+3 of the chunk, which is also one Philox counter of the noise
stream (kernels/noise.py). Reading t[b] once per program keeps the per-sample schedule lookups out of the
element loop and needs no integer division per element.
"""

import triton
import triton.language as tl

from fastddpm import contracts

MAX_ROWS = 1024  # 4096 elements per program
MAX_CHUNKS = 65535  # CUDA's limit on gridDim.y


def pow2_at_least(n, cap: int) -> int:
    """The smallest power of two ≥ n, at most ``cap`` (a power of two) and at least 1.

    Comparisons only: while torch.compile traces with dynamic shapes, n is a SymInt, and the launch constants
    (constexpr tile sizes, num_warps) must come out as plain ints; each comparison adds a range guard (the
    graph is reused until n crosses a power of two). triton.next_power_of_2 would return a symbolic
    bit-twiddling expression instead."""
    assert cap > 0 and cap & (cap - 1) == 0, f"cap must be a power of two, got {cap}"
    p = cap
    while p > 1 and p // 2 >= n:
        p //= 2
    return p


def tile_rows(per_sample) -> int:
    """Rows R of the [R, 4] tile for samples of ``per_sample`` elements: a power of two in [1, MAX_ROWS]
    (a row per Philox counter: contracts.counters_per_sample rows cover a sample)."""
    return pow2_at_least(contracts.counters_per_sample(per_sample), MAX_ROWS)


def grid(batch: int, per_sample: int, rows: int) -> tuple[int, int]:
    chunks = triton.cdiv(per_sample, 4 * rows)
    if chunks > MAX_CHUNKS:
        raise ValueError(f"a sample of {per_sample} elements is too large for one launch "
                         f"(at most {MAX_CHUNKS * 4 * rows})")
    return (batch, chunks)


def num_warps(rows: int) -> int:
    """Up to 8 warps, each thread keeping at least 4 consecutive elements (one 16-byte fp32 vector)."""
    return max(1, min(8, rows // 32))


def compute_dtype(dtype) -> "tl.dtype":
    """The math dtype of a kernel: float64 for float64 data, float32 for everything else."""
    import torch
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def tile(chunk, ROWS: tl.constexpr):
    """Row indices [R] of this chunk within its sample, and the element indices [R, 4] they cover."""
    rows = chunk * ROWS + tl.arange(0, ROWS)
    return rows, rows[:, None] * 4 + tl.arange(0, 4)[None, :]


@triton.jit
def load_t(t_ptr, b, T):
    """t[b], clamped into [0, T) so that a bad value can never read outside the tables (the host checks t)."""
    t = tl.load(t_ptr + b)
    return tl.minimum(tl.maximum(t, 0), T - 1)


@triton.jit
def sample_tile(t_ptr, N, T, ROWS: tl.constexpr):
    """The program's sample b, its tile (rows [R], element indices [R, 4], mask), b's first element and
    t[b]."""
    b = tl.program_id(0).to(tl.int64)
    rows, i = tile(tl.program_id(1), ROWS)
    return b, rows, i, i < N, b * N, load_t(t_ptr, b, T)
