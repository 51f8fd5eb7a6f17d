"""What the two CUDA-graph paths (the Trainer's fast path, the graphed sampler) share."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def host_syncs_raise():
    """Within the block, a device→host synchronisation (``.item()``, ``float(tensor)``, a copy to the CPU)
    raises instead of running (``torch.cuda.set_sync_debug_mode("error")``).

    A step that would sync cannot be captured in a CUDA graph, and a capture that fails leaves torch's CUDA
    state broken for the rest of the process (the default generator and the caching allocator stay in capture
    mode: the next random draw or capture raises). So the last warm-up step before a capture runs under this,
    and a step that syncs is never captured."""
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)
