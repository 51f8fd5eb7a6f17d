"""Compile every fastddpm Triton kernel ahead of time for real GPUs, with no GPU present.

The interpreter that runs the kernels in the CPU tests accepts code the compiler rejects; this compiles each
kernel for sm_80 and sm_90 with triton.compile(ASTSource(...), target=GPUTarget(...)) in each dtype and each
constexpr configuration the launchers use, and checks the PTX for what the design relies on:
  * 128-bit global loads (ld.global.v4) in the streaming kernels for fp32 data, when compiled with the 16-byte
    divisibility the JIT specialises on for aligned tensors and sizes;
  * no register spills (cuobjdump -res-usage: LOCAL:0). The noise kernels keep a small stack frame
    (STACK:8–16): that is libdevice's sinf/cosf slow path for huge arguments (Box–Muller's angle never takes
    it), not a spill.
It prints one JSON line per compiled kernel (arch, kernel, config, registers, spills, shared memory, v4 loads)
and a summary; the exit status is non-zero on any failure. Run it without TRITON_INTERPRET.

    python tools/triton_aot.py [--arch 80 --arch 90] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tools/triton_aot.py: unset TRITON_INTERPRET (the interpreter replaces the compiler)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastddpm.kernels import common, loss, q_sample, reverse_step  # noqa: E402

DTYPES = {"fp32": ("fp32", tl.float32), "fp16": ("fp16", tl.float32), "bf16": ("bf16", tl.float32),
          "fp64": ("fp64", tl.float64)}
ROWS = [1024, 64, 16, 1]  # the tile sizes tile_rows() picks: large samples, mid, small, one element


def pointer_types(kernel, constexprs, data: str, cd: str) -> dict[str, str]:
    """Triton signature of a kernel for one data dtype: data pointers, int64 indices, float32 tables."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("t_ptr", "t_prev_ptr", "seed_ptr"):
            sig[name] = "*i64"
        elif name in ("sqrt_ac_ptr", "sqrt_1m_ac_ptr", "table_ptr", "ac_ptr", "scale_ptr"):
            sig[name] = "*fp32"
        elif name in ("partial_ptr", "loss_ptr", "mean_ptr", "grad_ptr"):
            sig[name] = f"*{cd}"
        elif name.endswith("_ptr"):
            sig[name] = f"*{data}"
        elif name in ("offset",):
            sig[name] = "i64"
        elif name in ("clip", "eta", "final_alpha_cumprod", "gamma"):
            sig[name] = "fp32"
        else:  # sizes: N, T, B, n_chunks
            sig[name] = "i32"
    return sig


def aligned(kernel, sig) -> dict:
    """The divisibility attributes the JIT gives 16-byte aligned pointers and sizes divisible by 16."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
            if sig[name].startswith("*") or name == "N"}


def variations(base: dict, **choices) -> list[dict]:
    """The base configuration and, for each constexpr, every other value it takes with the rest at the
    base."""
    out = [dict(base)]
    for name, values in choices.items():
        out += [{**base, name: v} for v in values if v != base[name]]
    return out


def configs(quick: bool):
    """(kernel, data dtype, constexprs): each kernel in every data dtype at its common configuration, and in
    fp32 with each constexpr flag through every value the launchers use (one flag at a time: the flags select
    independent code paths)."""
    flags, objectives = [False, True], [0, 1, 2]
    data_types = ["fp32", "bf16"] if quick else ["fp32", "fp16", "bf16", "fp64"]
    kernels = [
        (q_sample.q_sample_kernel, dict(HAS_NOISE=False, WRITE_NOISE=False, ROWS=1024),
         dict(HAS_NOISE=flags, WRITE_NOISE=flags, ROWS=ROWS)),
        (loss.loss_partial_kernel, dict(OBJECTIVE=0, HAS_NOISE=False, ROWS=1024),
         dict(OBJECTIVE=objectives, HAS_NOISE=flags, ROWS=ROWS)),
        (loss.loss_backward_kernel,
         dict(OBJECTIVE=0, HAS_NOISE=False, HAS_GAMMA=False, REDUCTION=1, ROWS=1024),
         dict(OBJECTIVE=objectives, HAS_NOISE=flags, HAS_GAMMA=flags, REDUCTION=[0, 1], ROWS=ROWS)),
        (loss.loss_finalize_kernel, dict(OBJECTIVE=0, HAS_GAMMA=True, BLOCK_B=1024),
         dict(OBJECTIVE=objectives, HAS_GAMMA=flags, BLOCK_B=[1024, 16, 1])),
        (reverse_step.p_sample_kernel, dict(OBJECTIVE=0, HAS_NOISE=False, HAS_CLIP=True, HAS_THRESHOLD=False,
                                            WRITE_X0=False, WRITE_NOISE=False, ROWS=1024),
         dict(OBJECTIVE=objectives, HAS_NOISE=flags, HAS_CLIP=flags, HAS_THRESHOLD=flags, WRITE_X0=flags,
              WRITE_NOISE=flags, ROWS=ROWS)),
        (reverse_step.ddim_kernel, dict(OBJECTIVE=0, HAS_NOISE=False, HAS_CLIP=True, HAS_THRESHOLD=False,
                                        REDERIVE=True, WRITE_X0=False, WRITE_NOISE=False, STOCHASTIC=False,
                                        ROWS=1024),
         dict(OBJECTIVE=objectives, HAS_NOISE=flags, HAS_CLIP=flags, HAS_THRESHOLD=flags, REDERIVE=flags,
              WRITE_X0=flags, WRITE_NOISE=flags, STOCHASTIC=flags, ROWS=ROWS)),
    ]
    for kernel, base, choices in kernels:
        for data in data_types:
            cd = DTYPES[data][1]
            for config in (variations(base, **choices) if data == "fp32" else [base]):
                yield kernel, data, {**config, "CD": cd}


STREAMING = {"q_sample_kernel", "loss_partial_kernel", "loss_backward_kernel", "p_sample_kernel",
             "ddim_kernel"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resources(cubin: bytes) -> dict:
    """Registers, local memory (spills) and shared memory of the compiled kernel, from cuobjdump
    -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {"registers": int(usage.get("REG", -1)), "local_bytes": int(usage.get("LOCAL", 0)),
            "stack_bytes": int(usage.get("STACK", 0)), "smem_bytes": int(usage.get("SHARED", 0))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append",
                        help="compute capability ×10 (default: 80 and 90)")
    parser.add_argument("--quick", action="store_true", help="fp32 and bf16 only")
    args = parser.parse_args()
    archs = args.arch or [80, 90]
    failures, count, t0 = [], 0, time.time()
    for arch in archs:
        for kernel, data, constexprs in configs(args.quick):
            cd = "fp64" if constexprs.get("CD") == tl.float64 else "fp32"
            sig = pointer_types(kernel, constexprs, DTYPES[data][0], cd)
            name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
            label = {k: (str(v) if isinstance(v, tl.dtype) else v) for k, v in constexprs.items()}
            record = {"arch": f"sm_{arch}", "kernel": name, "data": data, "config": label}
            try:
                rows = constexprs.get("ROWS", 1)
                warps = common.num_warps(rows) if "ROWS" in constexprs else 4
                compiled = triton.compile(ASTSource(kernel, sig, constexprs, aligned(kernel, sig)),
                                          target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
                ptx = compiled.asm["ptx"]
                record.update(resources(compiled.asm["cubin"]), v4_loads=ptx.count("ld.global.v4"))
                problems = []
                if record["local_bytes"]:
                    problems.append(f"spills {record['local_bytes']} bytes to local memory")
                per_thread = 4 * rows // (32 * warps)
                if name in STREAMING and data == "fp32" and per_thread >= 4 and record["v4_loads"] == 0:
                    problems.append("no 128-bit global loads (ld.global.v4) for aligned fp32 data")
                if problems:
                    record["problems"] = problems
                    failures.append(record)
            except Exception as e:  # a compile error: report it with the configuration
                record["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
                failures.append(record)
            count += 1
            print(json.dumps(record), flush=True)
    print(f"summary: {count} kernel configurations compiled for {', '.join(f'sm_{a}' for a in archs)} in "
          f"{time.time() - t0:.0f} s; {len(failures)} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
