"""Interleaved timing, on the CPU, of the small U-Net's sampling loop (per step) and training step: eager (the
reference math everywhere, GroupNorm+SiLU included), torch.compile of that, and fastddpm. Every round runs
each provider once, in turn, and each provider's median and best round are kept: on a shared machine the
load changes between pytest-benchmark's one-provider-after-the-other runs.

    .venv/bin/python benchmarks/e2e_ratios.py [--rounds 15] [--batches 1,16,128] [--threads N]
        [--system-malloc]
    .venv/bin/python benchmarks/e2e_ratios.py --threads 1 --clock thread

`--clock thread` (with `--threads 1`) times the CPU time of the one thread doing the work: unaffected by the
time other processes hold the core, so it stays readable on a busy machine.

glibc's allocation thresholds are set first (benchmarks/steady_malloc.py) unless --system-malloc is given.

    python benchmarks/e2e_ratios.py --table bench_sampling.json bench_training.json ...

prints instead issue 18's table from pytest-benchmark files of benchmarks/test_end_to_end.py
(tools/device_check.sh runs it on a GPU): per case the median of every provider, the fast path's per step for
sampling, and the fast path's speed-up against eager PyTorch and against compiled diffusers. It imports no
torch.
"""
import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

os.environ.setdefault("FASTDDPM_NO_PROGRESS", "1")

STEPS = 10
PROVIDERS = ("eager", "compile", "fastddpm")
E2E_PROVIDERS = ("eager", "compile", "diffusers", "diffusers-compile", "fastddpm", "fast-path")


def with_backend(provider, fn):
    """fn run with the reference GroupNorm+SiLU in the U-Net for the reference providers."""
    value = "reference" if provider != "fastddpm" else "auto"

    def call():
        old = os.environ.get("FASTDDPM_BACKEND")
        os.environ["FASTDDPM_BACKEND"] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["FASTDDPM_BACKEND"]
            else:
                os.environ["FASTDDPM_BACKEND"] = old
    return call


def diffusion(provider, sampling_timesteps=None):
    import torch

    from fastddpm import Diffusion, UNet

    torch.manual_seed(0)
    net = UNet.small()
    if provider == "compile":
        net = torch.compile(net)
    return Diffusion(net, image_size=8, timesteps=1000, sampling_timesteps=sampling_timesteps,
                     backend="reference" if provider != "fastddpm" else "auto", channels=1)


def cases(batches):
    import torch

    out = {}
    for batch in batches:
        fns = {}
        for p in PROVIDERS:
            d = diffusion(p, STEPS)
            fns[p] = with_backend(p, lambda d=d, b=batch: d.sample(b, progress=False))
        out[f"sampling, batch {batch} (per step)"] = (fns, STEPS)
    fns = {}
    for p in PROVIDERS:
        d = diffusion(p)
        images = torch.rand(32, 1, 8, 8)
        opt = torch.optim.Adam(d.model.parameters(), lr=1e-4)

        def step(d=d, opt=opt, images=images):
            loss = d(images)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        fns[p] = with_backend(p, step)
    out["training step, batch 32"] = (fns, 1)
    return out


def e2e_table(paths: list[str]) -> str:
    """Issue 18's table from benchmark files of benchmarks/test_end_to_end.py ("" when they hold none)."""
    rows: dict[tuple, dict[str, float]] = defaultdict(dict)
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for bench in data.get("benchmarks", []):
            name, params = bench["name"].split("[")[0], bench.get("params") or {}
            if name not in ("test_training_step", "test_sampling_loop") or "net_name" not in params:
                continue
            per_step = STEPS if name == "test_sampling_loop" else 1
            if name == "test_training_step":
                order, what = (0, 0), f"training step, {params['amp']}"
            else:
                order, what = (1, params["batch"]), f"DDIM sampling, batch {params['batch']}, per step"
            key = (params["device"], params["net_name"], order, what)
            rows[key][params["provider"]] = bench["stats"]["median"] / per_step
    if not rows:
        return ""
    lines = ["| device | U-Net | case | " + " | ".join(E2E_PROVIDERS) + " | fast path × eager | × diffusers "
             "compiled |", "|---" * (len(E2E_PROVIDERS) + 5) + "|"]
    for (device, net, _, what), times in sorted(rows.items()):
        cells = " | ".join(f"{times[p] * 1e3:.2f} ms" if p in times else "—" for p in E2E_PROVIDERS)
        fast = times.get("fast-path")
        ratios = [f"{times[p] / fast:.2f}×" if fast and p in times else "—"
                  for p in ("eager", "diffusers-compile")]
        lines.append(f"| {device} | {net} | {what} | {cells} | {' | '.join(ratios)} |")
    return "\n".join(lines)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--table":
        table = e2e_table(sys.argv[2:])
        if table:
            print("\nissue 18's table (benchmarks/test_end_to_end.py; median per call, per step for "
                  "sampling)\n")
            print(table)
        return
    import torch

    from steady_malloc import steady_malloc  # (this folder, run as a script)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batches", default="1,16,128")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--system-malloc", action="store_true", help="keep glibc's allocation thresholds")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="wall clock, or CPU time of this thread (needs --threads 1)")
    args = ap.parse_args()
    if args.clock == "thread" and args.threads != 1:
        ap.error("--clock thread measures one thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    malloc = ("glibc defaults" if args.system_malloc
              else ("steady malloc" if steady_malloc() else "mallopt failed"))
    if args.threads:
        torch.set_num_threads(args.threads)
    table = cases([int(b) for b in args.batches.split(",")])
    times = {(c, p): [] for c in table for p in PROVIDERS}
    for fns, _ in table.values():
        for fn in fns.values():
            fn()
            fn()  # compile, warm caches
    for _ in range(args.rounds):
        for case, (fns, per) in table.items():
            for p, fn in fns.items():
                start = clock()
                fn()
                times[(case, p)].append((clock() - start) / per)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, {malloc}, "
          f"{args.rounds} interleaved "
          "rounds; "
          "median (best) per call")
    print("| case | eager | torch.compile | fastddpm | vs eager | vs compile |")
    print("|---|---|---|---|---|---|")
    for case in table:
        med = {p: statistics.median(times[(case, p)]) * 1e3 for p in PROVIDERS}
        best = {p: min(times[(case, p)]) * 1e3 for p in PROVIDERS}
        cells = " | ".join(f"{med[p]:.2f} ms ({best[p]:.2f})" for p in PROVIDERS)
        print(f"| {case} | {cells} | {med['eager'] / med['fastddpm']:.2f}× | "
              f"{med['compile'] / med['fastddpm']:.2f}× |")


if __name__ == "__main__":
    main()
