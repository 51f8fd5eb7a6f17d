#!/usr/bin/env bash
# Builds and runs tools/draw_bench.cpp: the CPU draw's ns per normal, with and without GCC's pre-allocation
# scheduling (see csrc/cpu/fused_kernels.cpp). Needs g++ on x86-64; writes build/draw_bench.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
g++ -O3 -std=c++17 -o build/draw_bench tools/draw_bench.cpp
build/draw_bench
