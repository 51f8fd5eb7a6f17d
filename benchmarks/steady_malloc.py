"""glibc allocation thresholds for the interleaved CPU timing scripts of this folder.

glibc serves each multi-MB tensor with a fresh mmap (or trims the heap after it is freed), so every call
page-faults its outputs in again; at the sizes these scripts time that costs as much as the kernels, eager's
extra temporaries the most, and it varies from one process to the next. The scripts therefore first set
M_MMAP_THRESHOLD to its 32 MB maximum and M_TRIM_THRESHOLD off (as MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=... would, or a caching allocator such as jemalloc), unless asked not to.
"""
import ctypes
import ctypes.util


def steady_malloc() -> bool:
    """glibc: keep freed tensors' memory for the next allocation (no mmap per tensor up to 32 MB, no trim)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
