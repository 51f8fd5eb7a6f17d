"""Each fused op's host cost per call, on the CPU: what a GPU user pays at small sizes on top of the kernels.

    python tools/host_overhead.py [--calls 2000]

For the Triton path (the ops' CUDA implementation), the kernel launchers of kernels/ are replaced by no-ops
and the ops run on CPU tensors of the CIFAR-10 batch (128×3×32×32): what is left is fastddpm's Python, torch's
dispatcher and torch.library's layers, i.e. the host's work before Triton's own launch. The C++ CPU path is
timed whole, kernels included, at a small size (8×1×8×8; GroupNorm+SiLU, whose CUDA kernel is C++, at 8×32×4×4
with 8 groups, fp32 and bf16, through fastddpm.functional), as a reference point. Each line is the median of 5
runs of N back-to-back calls, in µs per call. Numbers depend on the machine and its load: compare lines of one
run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # the Triton backend for CPU tensors (its kernels never run here)

import torch  # noqa: E402

from fastddpm.ops import new_seed  # noqa: E402
from fastddpm.ops.diffusion_loss import diffusion_loss  # noqa: E402
from fastddpm.ops.q_sample import q_sample  # noqa: E402
from fastddpm.ops.reverse_step import ddim_step, p_sample_step  # noqa: E402
from fastddpm.schedules import NoiseSchedule, get_beta_schedule  # noqa: E402


def stub_launchers() -> None:
    """Every Triton launcher of kernels/ returns at once."""
    import fastddpm.kernels.loss as loss
    import fastddpm.kernels.q_sample as qs
    import fastddpm.kernels.reverse_step as rs

    qs.launch_q_sample = lambda *a, **k: None
    loss.launch_loss = lambda *a, **k: None
    loss.launch_loss_backward = lambda *a, **k: None
    rs.launch_p_sample = lambda *a, **k: None
    rs.launch_ddim = lambda *a, **k: None


def per_call_us(fn, calls: int) -> float:
    for _ in range(min(100, calls)):
        fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def cases(backend: str, shape):
    sched = NoiseSchedule(get_beta_schedule("linear", 1000))
    x = torch.randn(shape)
    noise, out = torch.randn_like(x), torch.randn_like(x)
    pred = torch.randn_like(x).requires_grad_(True)
    t = torch.randint(0, 1000, (shape[0],))
    t_prev = (t - 20).clamp_min(-1)
    seed = new_seed("cpu")
    common = dict(backend=backend, check=False)

    def loss_fwd_bwd():  # (autograd.grad: no accumulation into pred.grad, which is no part of the op)
        torch.autograd.grad(diffusion_loss(sched, pred, x, t, seed=seed, **common), pred)

    return {
        "q_sample, ε given": lambda: q_sample(sched, x, t, noise, **common),
        "q_sample, ε drawn (key given)": lambda: q_sample(sched, x, t, seed=seed, **common),
        "q_sample, ε drawn (fresh key)": lambda: q_sample(sched, x, t, **common),
        "diffusion_loss forward (no grad)": lambda: diffusion_loss(sched, out, x, t, seed=seed, **common),
        "diffusion_loss forward + backward": loss_fwd_bwd,
        "p_sample_step, z drawn": lambda: p_sample_step(sched, out, x, t, seed=seed, write_x0=False,
                                                        **common),
        "ddim_step (η = 0)": lambda: ddim_step(sched, out, x, t, t_prev, write_x0=False, **common),
    }


def group_norm_silu_cases():
    from fastddpm.functional import group_norm_silu

    out = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        x = torch.randn(8, 32, 4, 4, dtype=dtype)
        w, b = torch.randn(32, dtype=dtype), torch.randn(32, dtype=dtype)
        xg = x.clone().requires_grad_(True)
        wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        out[f"group_norm_silu forward, {name}"] = lambda x=x, w=w, b=b: group_norm_silu(x, 8, w, b)
        out[f"group_norm_silu forward + backward, {name}"] = (
            lambda x=xg, w=wg, b=bg: torch.autograd.grad(group_norm_silu(x, 8, w, b).sum(), (x, w, b)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {args.calls} calls, median of 5 runs, µs per call")
    print("| op | Triton path, launches stubbed (128×3×32×32) | C++ CPU path, whole (8×1×8×8) |")
    print("|---|---|---|")
    cpp = {name: per_call_us(fn, args.calls) for name, fn in cases("cpp", (8, 1, 8, 8)).items()}
    stub_launchers()
    for name, fn in cases("triton", (128, 3, 32, 32)).items():
        print(f"| {name} | {per_call_us(fn, args.calls):.1f} | {cpp[name]:.1f} |", flush=True)
    for name, fn in group_norm_silu_cases().items():  # (no Triton path: its CUDA kernel is C++)
        print(f"| {name} | — | {per_call_us(fn, args.calls):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
