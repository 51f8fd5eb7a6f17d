#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheel the offline GPU machine lacks for the whole benchmark table:
# diffusers (the providers diffusers and diffusers-compile of benchmarks/test_end_to_end.py, and the tests that
# compare against it). That machine's image holds what it imports (huggingface-hub, safetensors, regex,
# requests, filelock, numpy, Pillow; importlib_metadata, which it names, is the standard library's on
# Python ≥ 3.8). Run here, where pip reaches an index; the device call then carries .whl and
# tools/device_check.sh installs it first.
#
#   bash tools/device_wheels.sh        # env: DEVICE_PYTHON_VERSION (3.12, the GPU machine's)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The release setup.py's test extra pins (diffusers>=0.42,<0.43), read from there so that the two never differ.
diffusers=$(python3 - <<'PY'
import re
text = open("setup.py", encoding="utf-8").read()
print(re.search(r'"(diffusers[^"]*)"', text).group(1))
PY
)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${DEVICE_PYTHON_VERSION:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "$diffusers"
ls -l .whl
