"""Interleaved best-of-N timing of the fused ops against eager and torch.compile on the CPU, for a shared
noisy machine where pytest-benchmark means swing with other load: every round runs every provider once, the
best round of each is kept.

    .venv/bin/python benchmarks/cpu_ratios.py [SHAPE e.g. 64x4x64x64] [ROUNDS] [--system-malloc]

glibc's allocation thresholds are set first (benchmarks/steady_malloc.py) unless --system-malloc is given.
"""
import sys
import time

import torch

from fastddpm import reference
from fastddpm.ops import new_seed
from fastddpm.ops.diffusion_loss import diffusion_loss, noised
from fastddpm.ops.q_sample import q_sample
from fastddpm.ops.reverse_step import p_sample_step
from fastddpm.schedules import NoiseSchedule, get_beta_schedule
from steady_malloc import steady_malloc  # this folder (run as a script)

SYSTEM_MALLOC = "--system-malloc" in sys.argv
sys.argv = [a for a in sys.argv if a != "--system-malloc"]
MALLOC = "glibc defaults" if SYSTEM_MALLOC else ("steady malloc" if steady_malloc() else "mallopt failed")
shape = tuple(int(s) for s in sys.argv[1].split("x")) if len(sys.argv) > 1 else (64, 3, 64, 64)
sched = NoiseSchedule(get_beta_schedule("linear", 1000))
x0 = torch.randn(shape)
t = torch.randint(0, 1000, (shape[0],))
pred = torch.randn_like(x0).requires_grad_(True)
noise = torch.randn_like(x0)
def step_eager(pred, x0, t):
    n = torch.randn_like(x0)
    x_t = reference.q_sample(sched, x0, t, n)
    return x_t, torch.autograd.grad(reference.diffusion_loss(sched, pred, x0, t, n), pred)[0]
def step_fused(pred, x0, t):  # ε from q_sample to the loss as Diffusion passes it
    x_t, noise_kwargs = noised(sched, x0, t, check=False)
    return x_t, torch.autograd.grad(diffusion_loss(sched, pred, x0, t, **noise_kwargs, check=False), pred)[0]
def rev_eager(o, x, t): return reference.p_sample_step(sched, o, x, t, torch.randn_like(x))[0]
def rev_fused(o, x, t):
    return p_sample_step(sched, o, x, t, seed=new_seed("cpu"), write_x0=False, check=False)[0]
def nq_eager(x0, t): return reference.q_sample(sched, x0, t, torch.randn_like(x0))
def nq_fused(x0, t): return q_sample(sched, x0, t, seed=new_seed("cpu"), check=False)[0]
def lo_eager(pred, x0, t):
    return torch.autograd.grad(reference.diffusion_loss(sched, pred, x0, t, torch.randn_like(x0)), pred)[0]
seed0 = new_seed("cpu")
def lo_fused(pred, x0, t):
    return torch.autograd.grad(diffusion_loss(sched, pred, x0, t, seed=seed0, check=False), pred)[0]
qs_c = torch.compile(lambda a, b, c: reference.q_sample(sched, a, b, c))
cases = {"noise+q_sample": (nq_eager, nq_fused, (x0, t)),
         "loss fwd+bwd": (lo_eager, lo_fused, (pred, x0, t)),
         "noise+q_sample+loss fwd+bwd": (step_eager, step_fused, (pred, x0, t)),
         "reverse step": (rev_eager, rev_fused, (noise, x0, t)),
         "q_sample given noise": (lambda x, t, n: reference.q_sample(sched, x, t, n),
                                  lambda x, t, n: q_sample(sched, x, t, n, check=False), (x0, t, noise))}
fns = {}
for name, (e, f, args) in cases.items():
    c = torch.compile(e) if name != "q_sample given noise" else qs_c
    fns[name] = {"eager": e, "compile": c, "fastddpm": f}
    for fn in fns[name].values():
        fn(*args)
        fn(*args)
best = {(n, p): float("inf") for n in cases for p in ("eager", "compile", "fastddpm")}
# Interleaved: every provider in every round, in an order that rotates (a call pays for the dirty cache lines
# the previous one left; a fixed order would favour whoever follows the cleanest).
for rep in range(int(sys.argv[2]) if len(sys.argv) > 2 else 15):
    for name, (_, _, args) in cases.items():
        order = list(fns[name])
        for p in order[rep % len(order):] + order[:rep % len(order)]:
            fn = fns[name][p]
            a = time.perf_counter()
            fn(*args)
            best[(name, p)] = min(best[(name, p)], time.perf_counter() - a)
print(f"shape {'x'.join(map(str, shape))} ({x0.numel()} elements), threads {torch.get_num_threads()}, "
      f"torch {torch.__version__}, {MALLOC}; best of interleaved rounds")
print("| case | eager | torch.compile | fastddpm | × faster of eager/compile |")
print("|---|---|---|---|---|")
for name in cases:
    e, c, f = (best[(name, p)] * 1e3 for p in ("eager", "compile", "fastddpm"))
    print(f"| {name} | {e:.3f} ms | {c:.3f} ms | {f:.3f} ms | {min(e, c) / f:.2f} |")
