"""Shared pieces of the benchmark suite: providers, devices, and the bytes-moved bookkeeping."""
import itertools
import math
import os
import time

os.environ.setdefault("FASTDDPM_NO_PROGRESS", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # only matters on machines without a GPU

import pytest  # noqa: E402
import torch  # noqa: E402

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
    """Time fn and record bytes moved, GB/s and, on a GPU, the fraction of a device-to-device copy's bandwidth
    measured in the same session, in extra_info.

    On the CPU each round is one call. On a GPU each round is a run of back-to-back calls (≥ 1 ms) followed by
    one synchronize, and the time is per call: the steady-state rate, as the copy's bandwidth is measured. One
    call then one synchronize per round would add the host's launch and sync latency (tens of µs) to every
    call and understate a fast kernel's GB/s."""
    if device == "cuda":
        result = _run_cuda(benchmark, fn)
    else:
        fn()  # warm-up: compilation, allocator
        result = benchmark(fn)
    benchmark.extra_info["bytes"] = bytes_moved
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["GB/s"] = bytes_moved / stats.stats.mean / 1e9
        if device == "cuda":
            benchmark.extra_info["calls per round"] = stats.iterations
            benchmark.extra_info["copy GB/s"] = copy_bandwidth(device)
            benchmark.extra_info["fraction of copy"] = benchmark.extra_info["GB/s"] / copy_bandwidth(device)
    return result


def _run_cuda(benchmark, fn):
    fn()  # warm-up: compilation, autotuning, allocator, CUDA graph capture
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per_call = max((time.perf_counter() - start) / 3, 1e-7)
    iterations = max(1, min(1000, math.ceil(1e-3 / per_call)))
    # the --benchmark-max-time and --benchmark-min-rounds options, as benchmark(fn) would use them
    max_time, min_rounds = getattr(benchmark, "_max_time", 1.0), getattr(benchmark, "_min_rounds", 5)
    rounds = max(min_rounds, min(1000, math.ceil(max_time / (per_call * iterations))))
    calls = itertools.count(1)

    def call():
        out = fn()
        if next(calls) % iterations == 0:  # the last call of each round (pedantic times whole rounds)
            torch.cuda.synchronize()
        return out

    result = benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=1)
    torch.cuda.synchronize()
    return result


def compiled(fn, device: str):
    """torch.compile of a reference function; CUDA graphs are not used (mode='default') so that it times the
    same launches as eager."""
    return torch.compile(fn)


def elements(device: str) -> tuple[int, ...]:
    """The data shape of the streaming-op benchmarks: ≥ 16M elements on a GPU, 786k on the CPU."""
    return (64, 4, 256, 256) if device == "cuda" else (64, 3, 64, 64)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
