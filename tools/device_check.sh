#!/usr/bin/env bash
# On a GPU machine (its own python, torch and triton; no network): build fastddpm._C with CUDA for the card,
# run the GPU-only tests (pytest -m cuda) and the benchmarks, print a short summary last.
# Full logs go to $OUT when it is set. Budget: under 8 minutes.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 FASTDDPM_NO_PROGRESS=1 MAX_JOBS=${MAX_JOBS:-16} TRITON_INTERPRET=0
arch=$($PY -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")' 2>/dev/null)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${arch:-9.0}}

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember the status
  local name=$1; shift
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log")")$'\n'
  [ "$rc" -eq 0 ] || failed=1
  return $rc
}

summary=""
failed=0
$PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())' | tee "$OUT/versions.log"
step build $PY -m pip install -e . --no-build-isolation --no-deps
step info $PY -m fastddpm info
step cuda_tests $PY -m pytest -m cuda -q tests/
# The Triton kernel tests of CI (interpreter on CPU tensors), here compiled on CUDA tensors.
step triton_kernels env FASTDDPM_TEST_DEVICE=cuda TRITON_INTERPRET=0 $PY -m pytest -q tests/test_kernels.py
# The GroupNorm+SiLU CUDA kernels under compute-sanitizer memcheck, on a subset of their tests (both split and
# unsplit statistics, odd sizes, 3-D, all layouts, fp32/fp16; misaligned views). Without the caching allocator
# every tensor and workspace is its own cudaMalloc, so an access past the end of any of them is caught.
sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null || true)
if [ -z "$sanitizer" ]; then
  summary+=$(printf '%-10s skipped: no compute-sanitizer' memcheck)$'\n'
elif ! timeout 120 "$sanitizer" --tool memcheck --error-exitcode 1 \
    $PY -c 'import torch; torch.ones(1, device="cuda").sum().item()' >"$OUT/memcheck_probe.log" 2>&1; then
  summary+=$(printf '%-10s skipped: compute-sanitizer does not run here: %s' memcheck \
    "$(grep -m 1 -i 'error\|not supported' "$OUT/memcheck_probe.log")")$'\n'
else
  step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 300 "$sanitizer" --tool memcheck --error-exitcode 1 \
    --print-limit 20 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_group_norm_silu.py \
    -k "(test_against_float64_reference and (2x6x5x7 or 2x48x37 or 2x320x8x8 or 1x256x64x64) and (fp32 or fp16)) \
or test_misaligned_views or test_grad_y_in_another_layout or test_without_weight_or_bias"
fi
if [ -d benchmarks ] && ls benchmarks/*.py >/dev/null 2>&1; then
  step bench $PY -m pytest benchmarks/ -q -k cuda --benchmark-json "$OUT/bench.json"
fi
echo "== summary ($(cat "$OUT/versions.log"))"
printf '%s' "$summary"
[ -f "$OUT/bench.json" ] && $PY tools/bench_table.py "$OUT/bench.json" | tee "$OUT/bench_table.md"
exit $failed
