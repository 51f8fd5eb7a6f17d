#!/usr/bin/env bash
# CUDA build checks on a machine without a GPU (`make cuda-check`; CI runs it after `make test`):
#  1. nvcc compiles every csrc/cuda/*.cu for sm_80 and sm_90 (-c), with the defines torch's builds use, and
#     fails on any warning: host -Wall -Wextra, and ptxas register spills or local memory. It also checks that
#     group_norm_silu.cu's streaming kernels got their 16-byte loads and stores in the PTX.
#  2. The whole extension fastddpm._C (csrc/ CPU and CUDA sources) builds and links against a CUDA build of
#     torch ($CUDA_TORCH, CUDA 13.0, installed once into $CUDA_VENV), from a copy of the sources, so the CPU
#     build in fastddpm/ is never touched. The .so then loads into that torch with every symbol resolved
#     (dlopen RTLD_NOW) and registers the CUDA kernels of the ops in csrc/cuda/*_binding.cpp.
#  3. tools/cuda_emulator/emulate.py --quick runs the GroupNorm+SiLU kernels on the CPU against float64.
# Without nvcc it says so and exits 0, except under CI=true, where it fails. On success it touches
# $CUDA_VENV/.checked, the Makefile's stamp.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
CUDA_VENV=${CUDA_VENV:-.venv-cuda}
CUDA_TORCH=${CUDA_TORCH:-torch==2.14.1}
PYTHON=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-2}
ARCH_LIST="8.0;9.0"
GENCODE=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
t_start=$SECONDS

say() { printf '== cuda-check: %s\n' "$*"; }

# The toolkit: $CUDA_HOME, /usr/local/cuda, or the nvcc on PATH (which may be a wrapper script: then the
# toolkit is the TOP that `nvcc --dryrun` reports).
find_cuda_home() {
  local home nvcc top
  for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    if [ -n "$home" ] && [ -x "$home/bin/nvcc" ] && [ -f "$home/include/cuda_runtime_api.h" ]; then
      echo "$home"
      return 0
    fi
  done
  nvcc=$(command -v nvcc) || return 1
  home=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  if [ -f "$home/include/cuda_runtime_api.h" ]; then
    echo "$home"
    return 0
  fi
  top=$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  if [ -n "$top" ] && [ -f "$top/include/cuda_runtime_api.h" ]; then
    (cd "$top" && pwd)
    return 0
  fi
  return 1
}

if ! CUDA_HOME=$(find_cuda_home); then
  say "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  say "NO nvcc FOUND (CUDA_HOME, /usr/local/cuda, PATH): the CUDA sources were NOT compiled"
  say "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  if [ "${CI:-}" = "true" ]; then
    say "CI=true: failing (CI must compile csrc/cuda/)"
    exit 1
  fi
  exit 0
fi
export CUDA_HOME
NVCC="$CUDA_HOME/bin/nvcc"
say "toolkit $CUDA_HOME ($("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ---- 1. every .cu, compile only, warnings are errors
NVCC_FLAGS=(-std=c++20 -O3 "${GENCODE[@]}"
  # what torch.utils.cpp_extension passes to nvcc: no implicit half/bfloat16 conversions or operators
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
  -Xcompiler -Wall,-Wextra -Werror all-warnings -Xptxas -warn-spills,-warn-lmem-usage)
t0=$SECONDS
shopt -s nullglob
cu_files=(csrc/cuda/*.cu)
for cu in "${cu_files[@]}"; do
  name=$(basename "$cu" .cu)
  mkdir -p "$tmp/keep/$name"
  say "nvcc sm_80+sm_90 $cu"
  "$NVCC" "${NVCC_FLAGS[@]}" --keep --keep-dir "$tmp/keep/$name" -c "$cu" -o "$tmp/$name.o"
done
# The fused GroupNorm+SiLU kernels must move 16 bytes a load and a store where they can (ld.global.nc.v4.u32,
# st.global.wb.v4.u32): a change that lost them would still compile and pass every test.
gn_ptx="$tmp/keep/group_norm_silu/group_norm_silu.compute_90.ptx"
if [ -f "$gn_ptx" ]; then
  loads=$(grep -c 'ld\.global\.nc\.v4\.u32' "$gn_ptx" || true)
  stores=$(grep -c 'st\.global\.wb\.v4\.u32' "$gn_ptx" || true)
  say "group_norm_silu sm_90 PTX: $loads 16-byte loads, $stores 16-byte stores"
  if [ "$loads" -eq 0 ] || [ "$stores" -eq 0 ]; then
    say "FAILED: group_norm_silu.cu has no 16-byte global loads or stores"
    exit 1
  fi
fi
t_nvcc=$((SECONDS - t0))
say "nvcc: ${#cu_files[@]} file(s) compiled for sm_80 and sm_90 in ${t_nvcc}s"

# ---- 2. the whole extension against a CUDA torch, in its own venv
t0=$SECONDS
CPY="$ROOT/$CUDA_VENV/bin/python"
if [ "$(cat "$CUDA_VENV/.torch" 2>/dev/null)" != "$CUDA_TORCH" ]; then
  say "installing $CUDA_TORCH into $CUDA_VENV (a CUDA build: several GB, once)"
  # The venv ends up ~7.5 GB and pip unpacks beside it: say so plainly rather than fail halfway through
  # pip with ENOSPC (seen: a disk filled by old clones' venvs).
  free_kb=$(df -Pk "$ROOT" 2>/dev/null | awk 'NR == 2 { print $4 }') || free_kb=""
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((10 * 1024 * 1024)) ]; then
    say "FAILED: installing $CUDA_TORCH needs about 10 GB free; $((free_kb / 1024 / 1024)) GB free under $ROOT"
    say "(free some space, e.g. other clones' .venv-cuda folders, and rerun)"
    exit 1
  fi
  [ -x "$CPY" ] || "$PYTHON" -m venv "$CUDA_VENV"
  "$CPY" -m pip install -q --no-cache-dir -U pip setuptools wheel ninja
  "$CPY" -m pip install -q --no-cache-dir "$CUDA_TORCH"
  echo "$CUDA_TORCH" >"$CUDA_VENV/.torch"
fi
t_venv=$((SECONDS - t0))

# A copy of what setup.py reads, built in $CUDA_VENV/build (kept, so that ninja recompiles only what
# changed), the .so written to a fresh folder.
t0=$SECONDS
src="$ROOT/$CUDA_VENV/build/src"
rm -rf "$src/csrc" "$src/fastddpm" "$src/kernels"
mkdir -p "$src"
cp -a setup.py pyproject.toml csrc fastddpm kernels "$src/"
say "building fastddpm._C with CUDA ($ARCH_LIST) against $("$CPY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
(cd "$src" && FASTDDPM_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH_LIST" "$CPY" setup.py -q build_ext --build-lib "$tmp/lib") \
  >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; say "FAILED: the CUDA extension did not build"; exit 1; }
grep -i 'warning' "$tmp/build.log" | grep -v 'UserWarning\|SetuptoolsDeprecationWarning\|setup.py install' || true
so=$(find "$tmp/lib" -name '_C*.so' | head -n 1)
[ -n "$so" ] || { cat "$tmp/build.log"; say "FAILED: no _C*.so was built"; exit 1; }
t_build=$((SECONDS - t0))

# ---- 3. it loads, every symbol resolves, the CUDA kernels are registered
"$CPY" - "$so" <<'EOF'
import ctypes
import importlib.util
import os
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402  (first: the extension links against libtorch without carrying its path)

path = sys.argv[1]
ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL)  # an unresolved symbol fails here, not at first call
spec = importlib.util.spec_from_file_location("fastddpm._C", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert module.with_cuda == 1, f"built without CUDA: with_cuda = {module.with_cuda}"
assert module.cuda_archs == "8.0;9.0", f"cuda_archs = {module.cuda_archs!r}"
missing = [f"{op} ({key})" for op, key in [
    ("fastddpm::group_norm_silu", "CUDA"),
    ("fastddpm::group_norm_silu_backward", "CUDA"),
    ("fastddpm::q_sample", "CPU"),
] if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
assert not missing, "no kernel registered for " + ", ".join(missing)
print(f"== cuda-check: {os.path.basename(path)} loads into torch {torch.__version__} (CUDA {torch.version.cuda}); "
      "CUDA kernels of group_norm_silu and group_norm_silu_backward registered")
EOF

# ---- 4. the GroupNorm+SiLU kernels run on the CPU (tools/cuda_emulator: threads as fibers, ASan), a quick
# set of cases against float64: the only check here that executes the kernels' indexing and reductions.
t0=$SECONDS
"$CPY" tools/cuda_emulator/emulate.py --quick >"$tmp/emulate.log" 2>&1 \
  || { grep -v '^ok ' "$tmp/emulate.log"; say "FAILED: the emulated GroupNorm+SiLU kernels"; exit 1; }
say "$(tail -n 1 "$tmp/emulate.log" | sed 's/^emulate: //') (emulated GroupNorm+SiLU kernels)"
t_emulate=$((SECONDS - t0))

touch "$CUDA_VENV/.checked"
say "OK in $((SECONDS - t_start))s (nvcc ${t_nvcc}s, venv ${t_venv}s, extension build ${t_build}s," \
  "emulation ${t_emulate}s)"
