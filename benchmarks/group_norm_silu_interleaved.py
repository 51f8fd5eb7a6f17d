"""Interleaved timing of group_norm_silu: eager / torch.compile / fastddpm, forward and forward+backward.

    .venv/bin/python benchmarks/group_norm_silu_interleaved.py [--reps 40] [--threads 2] [--device cpu]
    .venv/bin/python benchmarks/group_norm_silu_interleaved.py --threads 1 --clock thread

pytest-benchmark times one provider after the other; on a shared machine the load changes in between.
Here every round runs each provider once, in turn, so all of them see the same conditions; the order rotates
from round to round, because a call pays for the dirty cache lines the previous one left (eager's many
temporaries cost the next call ~0.1 ms at 1M elements: a fixed order favours whoever follows the cleanest).
The table gives per provider the median and the minimum over the rounds, and the speed-ups of fastddpm from
the medians.
Forward+backward is torch.autograd.grad of y with respect to x, weight and bias, for a given dy.
`--clock thread` (with `--threads 1`) measures the CPU time of the one thread doing the work instead of
the wall clock: unaffected by the time other processes hold the core, so it stays readable on a busy machine.

Allocation: glibc serves each multi-MB tensor with a fresh mmap (or trims the heap after it is freed), so
every call page-faults its outputs in again; at these sizes that costs as much as the kernels (both the
eager ops and the fused one). By default this script first sets glibc's M_MMAP_THRESHOLD to its 32 MB
maximum and M_TRIM_THRESHOLD off (mallopt; like MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=...,
or a caching allocator such as jemalloc), so that the table shows the kernels; `--system-malloc` keeps
glibc's defaults.
"""
import argparse
import statistics
import time

import torch

from fastddpm import reference
from fastddpm.functional import group_norm_silu
from steady_malloc import steady_malloc  # this folder (run as a script)

GROUPS = 32
CASES = [  # (shape, memory format, dtype)
    ((16, 128, 32, 32), "contiguous", torch.float32),
    ((16, 256, 16, 16), "contiguous", torch.float32),
    ((64, 64, 32, 32), "contiguous", torch.float32),
    ((16, 128, 32, 32), "channels_last", torch.float32),
    ((16, 128, 32, 32), "contiguous", torch.bfloat16),
]


def train_pair(x, num_groups, weight, bias):
    """y of the CPU training variant (save_silu_grad: its forward also writes SiLU', which its backward
    reads)."""
    return torch.ops.fastddpm.group_norm_silu.default(x, num_groups, weight, bias, 1e-5, True)[0]


def make_fn(op, x, weight, bias, dy, backward):
    if not backward:
        def fn():
            with torch.no_grad():
                return op(x, GROUPS, weight, bias)
        return fn
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]

    def fn():
        return torch.autograd.grad(op(leaves[0], GROUPS, leaves[1], leaves[2]), leaves, dy)
    return fn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40, help="rounds (each runs every provider once)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall clock, or CPU time of this thread (needs --threads 1, CPU)")
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's allocation thresholds")
    parser.add_argument("--train-pair", action="store_true",
                        help="also time the CPU training variant (group_norm_silu with save_silu_grad, whose "
                             "forward saves SiLU'; what bfloat16 and float16 train with) as a fourth "
                             "provider")
    parser.add_argument("--scrub", action="store_true",
                        help="before every timed call, write a 64 MB buffer: each call then starts from the "
                             "same cache state (full of another layer's dirty lines) whatever ran before it")
    args = parser.parse_args()
    malloc = ("glibc defaults" if args.system_malloc
              else ("steady malloc" if steady_malloc() else "mallopt failed"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and (torch.get_num_threads() != 1 or args.device != "cpu"):
        parser.error("--clock thread measures one thread: use it with --threads 1 on the CPU")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, {args.reps} rounds, "
          f"{args.clock} clock, {malloc}")
    extra = ["train pair"] if args.train_pair else []
    print("| case | pass | eager median (min) | compile median (min) | fastddpm median (min) | "
          + "".join(f"{name} median (min) | " for name in extra) + "vs eager | vs compile |")
    print("|---|---|---|---|---|" + "---|" * len(extra) + "---|---|")
    for shape, layout, dtype in CASES:
        gen = torch.Generator().manual_seed(0)
        x = (-2.3 + 0.5 * torch.randn(shape, generator=gen)).to(dtype).to(args.device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        weight = (1 + 0.3 * torch.randn(shape[1], generator=gen)).to(dtype).to(args.device)
        bias = (0.2 * torch.randn(shape[1], generator=gen)).to(dtype).to(args.device)
        dy = torch.randn(shape, generator=gen).to(dtype).to(args.device)
        for backward in (False, True):
            # A fresh torch.compile per case and pass (dynamo's caches reset: the same function compiled for
            # every case would otherwise hit the recompilation limit and fall back to eager).
            torch._dynamo.reset()
            providers = {"eager": reference.group_norm_silu,
                         "compile": torch.compile(reference.group_norm_silu),
                         "fastddpm": group_norm_silu}
            if args.train_pair:
                providers["train pair"] = train_pair
            fns = {name: make_fn(op, x, weight, bias, dy, backward) for name, op in providers.items()}
            for fn in fns.values():  # warm-up: compilation, allocator
                for _ in range(3):
                    fn()
            sync()
            times = {name: [] for name in fns}
            scrub = torch.zeros(16 << 20) if args.scrub else None  # 64 MB of float32, 2× this L3
            names = list(fns)
            for r in range(args.reps):
                # a rotating order: each provider follows each other equally often
                for name in names[r % len(names):] + names[:r % len(names)]:
                    if scrub is not None:
                        scrub.add_(1.0)
                    start = clock()
                    fns[name]()
                    sync()
                    times[name].append(clock() - start)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            low = {k: min(v) * 1e3 for k, v in times.items()}
            case = "×".join(map(str, shape)) + (" cl" if layout == "channels_last" else "")
            case += f" {str(dtype)[6:]}"
            cells = " | ".join(f"{med[k]:.2f} ms ({low[k]:.2f})" for k in fns)
            speedups = f"{med['eager'] / med['fastddpm']:.2f}× | {med['compile'] / med['fastddpm']:.2f}×"
            print(f"| {case} | {'fwd+bwd' if backward else 'fwd'} | {cells} | {speedups} |", flush=True)


if __name__ == "__main__":
    main()
