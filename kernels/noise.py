"""In-kernel Gaussian noise: Philox 4×32-10 keyed by a seed read from a device tensor.

The stream convention every fastddpm kernel follows (and the CPU kernels and ``fastddpm.reference``
reproduce): for a batch of B samples of N elements each, element i of sample b (i in memory order within
the sample) takes lane ``i % 4`` of the four normals ``tl.randn4x(seed, offset + b·⌈N/4⌉ + ⌊i/4⌋)``. One
call therefore uses the counters [offset, offset + B·⌈N/4⌉); the next call advances ``offset`` by that
much, or draws a fresh seed. Each Philox evaluation yields four normals (two Box–Muller pairs), so a
kernel runs one Philox per four elements.
"""

import triton
import triton.language as tl


def counters_per_call(batch: int, per_sample: int) -> int:
    """How far one call over [batch, per_sample] elements advances the Philox counter."""
    return batch * ((per_sample + 3) // 4)


@triton.jit
def normal_rows(seed, row_counter):
    """Normals for a [R, 4] tile whose row r holds the four lanes of Philox counter ``row_counter[r]``."""
    n0, n1, n2, n3 = tl.randn4x(seed, row_counter)
    lane = tl.arange(0, 4)[None, :]
    return tl.where(lane == 0, n0[:, None],
                    tl.where(lane == 1, n1[:, None], tl.where(lane == 2, n2[:, None], n3[:, None])))
