"""Shared pieces of the benchmark suite: providers, devices, and the bytes-moved bookkeeping."""
import math
import os
import tempfile
import time

import pytest
import torch  # (imports no triton)

from fastddpm import _extension

os.environ.setdefault("FASTDDPM_NO_PROGRESS", "1")
# torch.compile's cache in a folder of this build (fastddpm._extension.build_digest says why)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"fastddpm-inductor-{_extension.build_digest()}"))
if not torch.cuda.is_available():  # Triton on CPU tensors through its interpreter (as tests/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

PROVIDERS = ["eager", "compile", "fastddpm"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


_COPY_GBPS: dict[str, float] = {}


def copy_bandwidth(device: str) -> float:
    """GB/s of a device-to-device copy of 256 MiB, measured once per session (read + write counted)."""
    if device not in _COPY_GBPS:
        src = torch.empty(64 * 2**20, device=device)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        _COPY_GBPS[device] = 2 * src.numel() * 4 * 20 / (start.elapsed_time(end) / 1e3) / 1e9
    return _COPY_GBPS[device]


def run(benchmark, fn, device: str, bytes_moved: int):
    """Time fn and record bytes moved and GB/s in extra_info; on a GPU also the fraction of a device-to-device
    copy's bandwidth measured in the same session, and the per-call host cost.

    On the CPU each round is one call. On a GPU each round is one call as a user makes it: the L2 cache
    flushed first (by writing a buffer larger than it), CUDA events around the call, so that the time counts
    the host's work and the kernels on cold data; the median of the rounds is the case's time. The host's own
    cost per call is measured apart, as the wall time of back-to-back calls without a sync divided by their
    number ("per-call host (s)"): at small sizes it is what a user pays."""
    if device == "cuda":
        result, median = _run_cuda(benchmark, fn, device)
    else:
        fn()  # warm-up: compilation, allocator
        result = benchmark(fn)
        stats = getattr(benchmark, "stats", None)
        has_stats = stats is not None and getattr(stats, "stats", None) is not None
        median = stats.stats.median if has_stats else None
    benchmark.extra_info["bytes"] = bytes_moved
    if median:
        benchmark.extra_info["GB/s"] = bytes_moved / median / 1e9
        if device == "cuda":
            benchmark.extra_info["copy GB/s"] = copy_bandwidth(device)
            benchmark.extra_info["fraction of copy"] = benchmark.extra_info["GB/s"] / copy_bandwidth(device)
    return result


_FLUSH: dict[str, torch.Tensor] = {}


def flush_l2(device: str) -> None:
    """Evict the GPU's L2 cache (60 MB on an H200) by writing 256 MB, and wait for it."""
    if device not in _FLUSH:
        _FLUSH[device] = torch.empty(64 * 2**20, device=device)
    _FLUSH[device].zero_()
    torch.cuda.synchronize()


def per_call_host_cost(fn, budget_s: float = 0.5) -> float:
    """Seconds per call of back-to-back calls without a sync: the host's cost wherever the GPU keeps up."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    calls = max(10, min(1000, int(budget_s / max(time.perf_counter() - start, 1e-6))))
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    cost = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return cost


def _run_cuda(benchmark, fn, device: str):
    fn()  # warm-up: compilation, autotuning, allocator, CUDA graph capture
    torch.cuda.synchronize()
    host = per_call_host_cost(fn)
    times: list[float] = []

    def timed():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        return out

    # the --benchmark-max-time and --benchmark-min-rounds options, as benchmark(fn) would use them; 20 rounds
    # where they allow
    max_time, min_rounds = getattr(benchmark, "_max_time", 1.0), getattr(benchmark, "_min_rounds", 5)
    rounds = max(min_rounds, min(20, math.ceil(max_time / max(host, 1e-6))))
    result = benchmark.pedantic(timed, setup=lambda: flush_l2(device), rounds=rounds, iterations=1,
                                warmup_rounds=1)
    benchmark.extra_info["per-call host (s)"] = host
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(stats, "stats", None) is None:  # --benchmark-disable
        return result, None
    # The statistics of the event times (pytest-benchmark's own clock would add the sync's wake-up)
    stats.stats.data[:] = times[-len(stats.stats.data):]
    return result, stats.stats.median


def compiled(fn, device: str):
    """torch.compile of a reference function; CUDA graphs are not used (mode='default') so that it times the
    same launches as eager."""
    return torch.compile(fn)


def elements(device: str) -> tuple[int, ...]:
    """The data shape of the streaming-op benchmarks: 25M elements (issue 17's size) on a GPU, 786k on the
    CPU."""
    return (128, 3, 256, 256) if device == "cuda" else (64, 3, 64, 64)


# The CIFAR-10 training batch: 393k elements, where the host's cost per call decides.
CIFAR = (128, 3, 32, 32)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
