"""Shared pieces of the benchmark suite: providers, devices, and the bytes-moved bookkeeping."""
import os

os.environ.setdefault("FASTDDPM_NO_PROGRESS", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # only matters on machines without a GPU

import pytest  # noqa: E402
import torch  # noqa: E402

PROVIDERS = ["eager", "compile", "fastddpm"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(benchmark, fn, device: str, bytes_moved: int):
    """Time fn (synchronising on CUDA) and record bytes moved and GB/s in extra_info."""
    def call():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    call()  # warm-up: compilation, allocator
    result = benchmark(call)
    benchmark.extra_info["bytes"] = bytes_moved
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["GB/s"] = bytes_moved / stats.stats.mean / 1e9
    return result


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
