"""Run the GroupNorm+SiLU CUDA kernels (csrc/cuda/group_norm_silu.cu) on the CPU, without a GPU.

    python tools/cuda_emulator/emulate.py [--quick] [--no-asan]      # any python with torch (CPU is enough)

The .cu source is compiled by the host compiler through emu_cuda.h (each kernel launch rewritten into an
emulated one: blocks in turn, the threads of a block as fibers that meet at __syncthreads and at the warp
shuffles), with AddressSanitizer and UBSan, and gn_driver.cpp's exact-size, NaN-poisoned buffers. Then every
case below runs the forward and the backward and compares y, mean, rstd, grad_x, grad_weight and grad_bias
with a float64 reference: fp32 within DESIGN.md's tolerances, fp16/bf16 within twice the error of rounding the
float64 result to that dtype. The cases cover both layouts, all three dtypes, misaligned x (the narrower
vector paths), HW = 1, 3-D and 5-D shapes, and SM counts from 1 to 1000 (1000: every reduction split as far
as the plans go). What it cannot show: races between real threads, the fast-math intrinsics' accuracy
(__expf is expf here), and speed.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "group_norm_silu.cu")
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")

LAUNCH = re.compile(r"([A-Za-z_]\w*)(<[^<>;]*>)?<<<(.*?)>>>\(", re.S)


def transform(src: str) -> str:
    """`k<T, V><<<cfg>>>(` -> `::emu::Launch(name, k<T, V>, cfg)(`."""
    def launch(m):
        name, targs, cfg = m.group(1), m.group(2) or "", m.group(3)
        if targs:
            label = (f'(std::string("{name}<") + '
                     f'::emu::type_name<{targs[1:-1].split(",")[0].strip()}>() + "," + '
                     f'std::to_string({targs[1:-1].split(",")[1].strip()}) + ">").c_str()')
        else:
            label = f'"{name}"'
        return f"::emu::Launch({label}, {name}{targs}, {cfg})("
    out, n = LAUNCH.subn(launch, src)
    assert n > 0, "no kernel launch found"
    return out


def build(workdir: str, asan: bool) -> str:
    with open(SOURCE) as f:
        src = transform(f.read())
    emu_src = os.path.join(workdir, "group_norm_silu_emu.cpp")
    with open(emu_src, "w") as f:
        f.write(src)
    lib = os.path.join(workdir, "libgn_emu.so")
    flags = ["-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-Wno-attributes",
             "-I", HERE, "-I", os.path.join(ROOT, "csrc", "cuda"), "-isystem", CUDA_INCLUDE,
             f'-DGN_SOURCE="{emu_src}"']
    if asan:
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                  "-fno-omit-frame-pointer"]
    cmd = ["g++", *flags, os.path.join(HERE, "gn_driver.cpp"), "-o", lib]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f"emulate: built {os.path.basename(lib)} in {time.time() - t0:.0f}s "
          f"({'ASan+UBSan' if asan else 'plain'})", flush=True)
    return lib


# ---------------------------------------------------------------------------------------------------------
# The checks (run in a child process, so that the ASan runtime can be preloaded into it).

SHAPES = [
    ((2, 6, 5, 7), 3),
    ((3, 96, 9, 9), 32),
    ((4, 64), 4),  # HW = 1; not G = 32: in groups of 2, grad_x = O(eps / var) is ill-conditioned
    ((4, 32, 1, 1), 8),
    ((1, 32, 16, 16), 8),
    ((2, 48, 37), 6),
    ((2, 16, 3, 5, 7), 4),
    ((2, 128, 8, 8), 32),
    ((2, 320, 4, 4), 32),
    ((2, 512, 4, 4), 32),
    ((2, 64, 8, 8), 1),
    ((1, 8, 3, 300), 2),
    ((1, 64, 32, 32), 32),
    ((3, 1024, 2, 2), 1),
    ((1, 4, 128, 128), 2),  # few long groups: NCHW statistics split (S > 1) and backward row splits (Y > 1)
]


def check(lib_path: str, quick: bool) -> int:
    import torch
    import torch.nn.functional as F

    lib = ctypes.CDLL(lib_path)
    i64, i32, f32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.emu_forward.argtypes = [i64, i64, i64, i64, i32, i32, vp, vp, vp, f32, vp, vp, vp, i32, i32]
    lib.emu_backward.argtypes = [i64, i64, i64, i64, i32, i32, vp, vp, vp, vp, vp, vp, vp, vp, vp, i32, i32]
    lib.emu_log.restype = ctypes.c_char_p
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    eps = 1e-5

    def ptr(t):
        return None if t is None else t.data_ptr()

    def rel(out, ref):
        return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()

    def raw(t, layout):  # the memory the kernels see: [N, C, HW] or [N, HW, C], contiguous
        flat = t.reshape(t.shape[0], t.shape[1], -1)
        return (flat if layout == 0 else flat.transpose(1, 2)).contiguous()

    def unraw(buf, layout, shape):
        N, C = shape[:2]
        flat = buf.reshape(N, C, -1) if layout == 0 else buf.reshape(N, -1, C).transpose(1, 2)
        return flat.reshape(shape)

    def run_case(shape, groups, dtype, layout, num_sms, offset, affine):
        gen = torch.Generator().manual_seed(hash((shape, groups, layout, num_sms)) % 2**31)
        N, C = shape[:2]
        HW = 1
        for s in shape[2:]:
            HW *= s
        x = (-2.3 + 0.5 * torch.randn(shape, generator=gen)).to(dtype)
        gy = torch.randn(shape, generator=gen).to(dtype)
        w = (1 + 0.3 * torch.randn(C, generator=gen)) if affine in ("both", "weight") else None
        b = (0.2 * torch.randn(C, generator=gen)) if affine in ("both", "bias") else None
        xr, gyr = raw(x, layout), raw(gy, layout)
        y = torch.empty_like(xr)
        mean = torch.empty(N, groups)
        rstd = torch.empty(N, groups)
        off = offset * x.element_size()
        err = lib.emu_forward(N, C, HW, groups, layout, codes[dtype], ptr(xr), ptr(w), ptr(b), eps, ptr(y),
                              ptr(mean), ptr(rstd), num_sms, off)
        assert err == 0, f"forward returned cudaError {err}"
        gx = torch.empty_like(xr)
        gw = torch.empty(C) if w is not None else None
        gb = torch.empty(C) if b is not None else None
        err = lib.emu_backward(N, C, HW, groups, layout, codes[dtype], ptr(gyr), ptr(xr), ptr(mean),
                               ptr(rstd), ptr(w), ptr(b), ptr(gx), ptr(gw), ptr(gb), num_sms, off)
        assert err == 0, f"backward returned cudaError {err}"

        x64 = x.double().requires_grad_()
        w64 = w.double().requires_grad_() if w is not None else None
        b64 = b.double().requires_grad_() if b is not None else None
        # (a weight of ones where only the bias is given: torch's CPU group_norm backward fails for a bias
        # without a weight, "tensor does not have a device")
        ref_w = torch.ones(C, dtype=torch.float64) if w64 is None and b64 is not None else w64
        ref_y = F.silu(F.group_norm(x64, groups, ref_w, b64, eps))
        ref_y.backward(gy.double())
        grouped = x.double().reshape(N, groups, -1)
        ref_mean = grouped.mean(-1)
        ref_rstd = 1 / (grouped.var(-1, unbiased=False) + eps).sqrt()

        errs, limits = {}, {}
        pairs = [("y", unraw(y, layout, shape), ref_y.detach(), 1e-5), ("mean", mean, ref_mean, 1e-5),
                 ("rstd", rstd, ref_rstd, 1e-5), ("grad_x", unraw(gx, layout, shape), x64.grad, 1e-4)]
        if w is not None:
            pairs.append(("grad_weight", gw, w64.grad, 1e-4))
        if b is not None:
            pairs.append(("grad_bias", gb, b64.grad, 1e-4))
        for name, out, ref, limit in pairs:
            errs[name] = rel(out, ref)
            # outputs in dtype: against the error of rounding the reference to it
            if dtype != torch.float32 and name in ("y", "grad_x"):
                limit = 2 * rel(ref.to(dtype), ref) + 1e-6
            limits[name] = limit
        bad = {k: (f"{errs[k]:.2e}", f"{limits[k]:.2e}") for k in errs if not errs[k] <= limits[k]}
        return bad, errs

    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    cases = []
    for shape, groups in SHAPES:
        for layout in (0, 1):
            if layout == 1 and len(shape) == 2:
                continue
            for dtype in dtypes:
                cases.append((shape, groups, dtype, layout, 132, 0, "both"))
            if quick:
                continue
            cases.append((shape, groups, torch.float16, layout, 1000, 0, "both"))
            cases.append((shape, groups, torch.float32, layout, 7, 0, "weight"))
            # misaligned x: the narrower vector paths
            cases.append((shape, groups, torch.bfloat16, layout, 1, 1, "bias"))
            cases.append((shape, groups, torch.float32, layout, 1000, 2, "none"))
    failures = 0
    t0 = time.time()
    for case in cases:
        lib.emu_clear_log()
        bad, errs = run_case(*case)
        shape, groups, dtype, layout, num_sms, offset, affine = case
        label = (f"{str(shape):18} G={groups:<3} {str(dtype)[6:]:8} {'NHWC' if layout else 'NCHW'} "
                 f"sms={num_sms:<4} offset={offset} affine={affine:6}")
        launches = " ".join(line.split(" ")[0].replace("gn_", "") + line.split(" ")[1][4:]
                            for line in lib.emu_log().decode().strip().splitlines())
        if bad:
            failures += 1
            print(f"FAIL {label} {bad}\n     launches: {launches}", flush=True)
        else:
            worst = max(errs.values())
            print(f"ok   {label} worst {worst:.1e}  {launches}", flush=True)
    print(f"emulate: {len(cases) - failures} passed, {failures} failed in {time.time() - t0:.0f}s",
          flush=True)
    return 1 if failures else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one SM count and alignment per shape and dtype")
    parser.add_argument("--no-asan", action="store_true", help="build without AddressSanitizer/UBSan")
    parser.add_argument("--lib", help=argparse.SUPPRESS)  # child process: run the checks on this library
    args = parser.parse_args()
    if args.lib:
        sys.exit(check(args.lib, args.quick))
    asan = not args.no_asan
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True,
                             check=True).stdout.strip()
    if asan and not os.path.isabs(libasan):  # g++ prints the bare name when it has no such library
        print("emulate: no libasan.so for g++: running without AddressSanitizer/UBSan", flush=True)
        asan = False
    with tempfile.TemporaryDirectory() as workdir:
        lib = build(workdir, asan=asan)
        env = dict(os.environ)
        if asan:
            env["LD_PRELOAD"] = libasan
            env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1"
        cmd = [sys.executable, os.path.abspath(__file__), "--lib", lib] + (["--quick"] if args.quick else [])
        sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
