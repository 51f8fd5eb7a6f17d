"""Calls that must raise, each in its own process: which of them kill the interpreter, and where.

    python tools/bad_input_probe.py          # tools/device_check.sh runs it right after the build

Each case runs in a fresh `python -c`; a case that ends by a signal instead of its exception is run again
under gdb (or cuda-gdb, which also debugs host code) in batch mode, and the innermost frames of the crash are
printed. The cases separate the explanations of a crash on bad input: an error of torch's own (is every C++
exception fatal in this environment?), fastddpm's C++ errors with and without optional tensors, on the CPU and
on CUDA. Exit status 1 when any case crashed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

SETUP = "import torch, fastddpm; ops = torch.ops.fastddpm; cuda = torch.cuda.is_available()\n"
CASES = {
    "torch's own error": "torch.ones(2) + torch.ones(3)",
    "gn+silu cpu, no weight": "ops.group_norm_silu(torch.randn(2, 6, 4, 4), 4, None, None, 1e-5)",
    "gn+silu cpu, weight": ("ops.group_norm_silu(torch.randn(2, 6, 4, 4), 4, torch.ones(6), torch.ones(6), "
                            "1e-5)"),
    "gn+silu cpu, int dtype": "ops.group_norm_silu(torch.randn(2, 6, 4, 4).int(), 3, None, None, 1e-5)",
    "q_sample cpu, bad t": ("x = torch.randn(2, 3); a = torch.rand(10)\n"
                            "ops.q_sample(x, torch.tensor([0, 10]), a, a, torch.randn(2, 3), None, 0,"
                            " False)"),
    "functional cpu": "fastddpm.functional.group_norm_silu(torch.randn(2, 6, 4, 4), 4)",
    "gn+silu cuda, no weight": ("ops.group_norm_silu(torch.randn(2, 6, 4, 4, device='cuda'), 4, None, None, "
                                "1e-5)"),
    "gn+silu cuda, weight": ("w = torch.ones(6, device='cuda')\n"
                             "ops.group_norm_silu(torch.randn(2, 6, 4, 4, device='cuda'), 4, w, w, 1e-5)"),
    "gn+silu cuda, float64": ("ops.group_norm_silu(torch.randn(2, 6, 4, 4, device='cuda').double(), 3, None, "
                              "None, 1e-5)"),
    "functional cuda": "fastddpm.functional.group_norm_silu(torch.randn(2, 6, 4, 4, device='cuda'), 4)",
}
WRAP = ("try:\n{body}\nexcept (RuntimeError, ValueError, TypeError) as e:\n"
        "    print('raised', type(e).__name__)\n")


def program(case: str) -> str:
    body = "\n".join("    " + line for line in CASES[case].splitlines())
    if "cuda" in case:
        body = "    if not cuda:\n        print('no GPU')\n        raise SystemExit(0)\n" + body
    return SETUP + WRAP.format(body=body)


def backtrace(code: str) -> str:
    debugger = shutil.which("gdb") or shutil.which("cuda-gdb")
    if debugger is None:
        return "(no gdb or cuda-gdb here for a backtrace)"
    cmd = [debugger, "-batch", "-nx", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 25",
           "--args", sys.executable, "-c", code]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, errors="replace").stdout
    except subprocess.TimeoutExpired:
        return "(the debugger timed out)"
    frames = [line for line in out.splitlines() if line.startswith("#") or "signal" in line.lower()]
    return "\n".join(frames[:30]) or out[-3000:]


def environment() -> str:
    """What a crash on raising could depend on: the compilers that built the extension, torch's backtrace
    settings."""
    gcc = subprocess.run(["sh", "-c", "${CXX:-c++} --version | head -n 1"], capture_output=True,
                         text=True).stdout
    settings = {k: v for k, v in os.environ.items() if k.startswith(("TORCH_", "LD_", "PYTORCH_"))}
    return f"python {sys.version.split()[0]}; c++: {gcc.strip()}; env: {settings}"


def main() -> int:
    print(environment(), flush=True)
    crashed = 0
    for case in CASES:
        code = program(case)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, errors="replace",
                              env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        if proc.returncode < 0:
            crashed += 1
            name = signal.Signals(-proc.returncode).name
            print(f"CRASH {case}: {name}\n{backtrace(code)}", flush=True)
            # torch symbolises C++ backtraces itself when asked to: does the crash follow that setting?
            for var, value in (("TORCH_SHOW_CPP_STACKTRACES", "0"), ("TORCH_SHOW_CPP_STACKTRACES", "1")):
                again = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                       env={**os.environ, var: value})
                print(f"      with {var}={value}: rc={again.returncode}", flush=True)
        else:
            last = (proc.stdout.strip().splitlines() or [proc.stderr.strip()[-200:]])[-1]
            print(f"ok    {case}: rc={proc.returncode} {last}", flush=True)
    print(f"bad-input probe: {crashed} of {len(CASES)} cases crashed")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
