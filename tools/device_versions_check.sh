#!/usr/bin/env bash
# Before spending device time: build and compile, here and with no GPU, against the torch and triton that the
# device machine has (the device tool's KINDS.md: torch 2.11.0+cu130, triton 3.6.0, nvcc 13.0), which are not
# the versions this project's venvs use (2.13.0 CPU, 2.14.1+cu130, triton 3.9.0):
#  1. tools/check_cuda_build.sh with CUDA_TORCH=torch==$DEVICE_TORCH, in its own venv: nvcc compiles the .cu
#     files, the whole extension builds against that torch's headers and loads into it with its CUDA kernels
#     registered, and the emulated kernels pass;
#  2. tools/triton_aot.py under triton==$DEVICE_TRITON: every Triton kernel compiles for sm_80 and sm_90
#     (no spills, the 16-byte loads), with that Triton's compiler.
#
#   bash tools/device_versions_check.sh      # env: DEVICE_TORCH (2.11.0), DEVICE_TRITON (3.6.0), DEVICE_VENV
#
# torch 2.11.0 is not on this machine's disk: pip downloads it (about 4 GB with its CUDA libraries) into
# DEVICE_VENV (.venv-device) once. Not part of `make test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE_TORCH=${DEVICE_TORCH:-2.11.0}
DEVICE_TRITON=${DEVICE_TRITON:-3.6.0}
DEVICE_VENV=${DEVICE_VENV:-.venv-device}

# (CI=true: without nvcc, check_cuda_build.sh fails instead of passing with a notice)
CI=true CUDA_VENV=$DEVICE_VENV CUDA_TORCH="torch==$DEVICE_TORCH" bash tools/check_cuda_build.sh
"$DEVICE_VENV/bin/python" -m pip install -q "triton==$DEVICE_TRITON" numpy

# triton_aot.py imports fastddpm.kernels, which setup.py maps to kernels/: a copy of both packages, so that
# nothing is built or installed into this checkout for that venv.
pkg=$(mktemp -d)
trap 'rm -rf "$pkg"' EXIT
cp -r fastddpm "$pkg/fastddpm"
rm -f "$pkg"/fastddpm/_C*.so
cp -r kernels "$pkg/fastddpm/kernels"
env -u TRITON_INTERPRET PYTHONPATH="$pkg" "$DEVICE_VENV/bin/python" tools/triton_aot.py --arch 80 --arch 90 |
  tail -n 3
echo "== device versions check: OK (torch $DEVICE_TORCH, triton $DEVICE_TRITON)"
