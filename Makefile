# make build | make test | make demo | make bench | make cuda-check | make clean
#
# Each target creates .venv when it is absent, installs the tools, torch and triton into it once, and
# (re)builds fastddpm into it, in place, whenever setup.py, pyproject.toml or a file under csrc/ changes.
# torch: with no NVIDIA GPU, the CPU build torch==2.13.0 (an unpinned torch pulls a multi-GB CUDA build);
# with one, whatever CUDA torch the venv already has (plain `torch` if none). `make TORCH=torch==X.Y.Z`
# overrides either.

PYTHON ?= python3
VENV ?= .venv
MAX_JOBS ?= 2
export MAX_JOBS

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HAVE_NVIDIA_GPU := $(shell nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH ?= $(if $(HAVE_NVIDIA_GPU),,torch==2.13.0)
# Triton runs the kernels on the CPU through its interpreter in the tests (seen working: 3.9.0 with torch 2.13.0).
TRITON ?= triton==3.9.0
CSRC := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*.h csrc/*/*.h csrc/*/*.cuh)

DEPS := $(VENV)/.deps
INSTALLED := $(VENV)/.installed
# tools/check_cuda_build.sh (`make cuda-check`, which CI runs after `make test`): nvcc compiles csrc/cuda/*.cu,
# and the whole extension builds against a CUDA torch (about 5.5 GB) in its own venv; no GPU needed. The stamp
# skips it while nothing it reads has changed.
CUDA_VENV ?= .venv-cuda
CUDA_CHECKED := $(CUDA_VENV)/.checked

.PHONY: build test demo bench cuda-check clean distclean

build: $(INSTALLED)

# The benchmarks run too, each case once (--benchmark-disable), so that they never rot.
test: $(INSTALLED)
	$(PY) -m pytest benchmarks/ -q --benchmark-disable
	$(PY) -m pytest -q

demo: $(INSTALLED)
	$(VENV)/bin/fastddpm demo

# The whole suite timed (CPU, and CUDA when present), saved as build/bench.json, printed as one table.
bench: $(INSTALLED)
	mkdir -p build
	$(PY) -m pytest benchmarks/ -q --benchmark-json build/bench.json
	$(PY) tools/bench_table.py build/bench.json

cuda-check: $(CUDA_CHECKED)

$(CUDA_CHECKED): tools/check_cuda_build.sh $(wildcard tools/cuda_emulator/*) setup.py $(CSRC)
	CUDA_VENV=$(CUDA_VENV) bash tools/check_cuda_build.sh

$(PY):
	$(PYTHON) -m venv $(VENV)

# The stamp holds the torch and triton requirements it installed: asking for others reinstalls.
ifneq ($(shell cat $(DEPS) 2>/dev/null),$(TORCH) $(TRITON))
.PHONY: $(DEPS)
endif
$(DEPS): | $(PY)
	$(PIP) install -U pip setuptools wheel ninja
	if [ -n '$(TORCH)' ]; then $(PIP) install '$(TORCH)'; \
	elif ! $(PY) -c 'import torch' 2>/dev/null; then $(PIP) install torch; fi
	$(PIP) install '$(TRITON)'
	echo '$(TORCH) $(TRITON)' > $@

$(INSTALLED): $(DEPS) setup.py pyproject.toml $(CSRC)
	$(PIP) install -e '.[test]' --no-build-isolation
	touch $@

clean:
	rm -rf build *.egg-info fastddpm/_C*.so $(INSTALLED)
	find . \( -path ./$(VENV) -o -path ./$(CUDA_VENV) -o -path ./.venv-device \) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(CUDA_VENV) .venv-device
