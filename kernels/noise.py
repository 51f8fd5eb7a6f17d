"""In-kernel Gaussian noise: Philox 4×32-10 keyed by a seed read from a device tensor.

The stream convention is fastddpm/contracts.py's (the CPU kernels and ``fastddpm.reference`` follow it too):
element i of sample b (N elements, i in memory order) takes lane ``i % PHILOX_LANES`` of the normals
``tl.randn4x(seed, philox_counter)``. Each Philox evaluation yields four normals (two Box–Muller pairs), so a
kernel runs one Philox per four elements: one row of the [R, 4] tile (kernels/common.py).
"""

import triton
import triton.language as tl

from fastddpm import contracts

PHILOX_LANES = tl.constexpr(contracts.PHILOX_LANES)


@triton.jit
def sample_counters(offset, b, N, rows):
    """The Philox counters of rows ``rows`` (elements PHILOX_LANES·row ...) of sample b, N elements a sample:
    contracts.philox_counter, offset + b·⌈N / PHILOX_LANES⌉ + row."""
    return offset + b * ((N + PHILOX_LANES - 1) // PHILOX_LANES) + rows


@triton.jit
def normal_rows(seed, row_counter):
    """Normals for a [R, 4] tile whose row r holds the four lanes of Philox counter ``row_counter[r]``."""
    n0, n1, n2, n3 = tl.randn4x(seed, row_counter)
    lane = tl.arange(0, 4)[None, :]
    return tl.where(lane == 0, n0[:, None],
                    tl.where(lane == 1, n1[:, None], tl.where(lane == 2, n2[:, None], n3[:, None])))
