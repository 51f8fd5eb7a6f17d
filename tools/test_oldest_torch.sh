#!/usr/bin/env bash
# `make test` under the oldest torch the project supports (README; OLDEST_TORCH, default torch==2.11.0), on the
# CPU, in a copy of the sources: the editable install builds fastddpm/_C in place, and this checkout's build
# belongs to .venv's torch. The venv (.venv-oldest; PyPI's torch 2.11.0 is a CUDA build, about 4 GB, installed
# once) lives here and is reused; the extension is built for the CPU only (FASTDDPM_CUDA=0). CI runs it after
# `make test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OLDEST_TORCH=${OLDEST_TORCH:-torch==2.11.0}
copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$copy" 2>/dev/null ||
  { echo "test_oldest_torch: could not copy the sources" >&2; exit 1; }
echo "== oldest torch: $OLDEST_TORCH, sources copied to $copy"
FASTDDPM_CUDA=0 make -C "$copy" test VENV="$ROOT/.venv-oldest" TORCH="$OLDEST_TORCH"
