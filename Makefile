# make build | make test | make lint | make demo | make bench | make cuda-check | make test-oldest-torch
# make clean
#
# Each target creates .venv when it is absent, installs the tools, torch and triton into it once, and
# (re)builds fastddpm into it, in place, whenever setup.py, pyproject.toml or a file under csrc/ changes.
# torch: with no NVIDIA GPU, the CPU build torch==2.13.0 (an unpinned torch pulls a multi-GB CUDA build);
# with one, the venv sees the packages of $(PYTHON)'s environment and reuses the CUDA torch and triton installed
# there (a GPU machine may have no network), installing plain `torch`/`triton` only where none is. `make TORCH=torch==X.Y.Z`
# overrides either.

PYTHON ?= python3
VENV ?= .venv
MAX_JOBS ?= 2
export MAX_JOBS

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HAVE_NVIDIA_GPU := $(shell nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH ?= $(if $(HAVE_NVIDIA_GPU),,torch==2.13.0)
# Without a GPU, Triton runs the kernels on the CPU through its interpreter in the tests (seen working: 3.9.0
# with torch 2.13.0 and 2.11.0; 3.6.0's interpreter fails with numpy 2).
TRITON ?= $(if $(HAVE_NVIDIA_GPU),,triton==3.9.0)
UPGRADE := $(if $(HAVE_NVIDIA_GPU),,-U)
# The oldest torch the project supports (README), tested on the CPU by `make test-oldest-torch` (CI runs it;
# tools/test_oldest_torch.sh): PyPI's torch 2.11.0 is a CUDA build, about 4 GB once into .venv-oldest.
OLDEST_TORCH ?= torch==2.11.0
CSRC := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*.h csrc/*/*.h csrc/*/*.cuh)

DEPS := $(VENV)/.deps
INSTALLED := $(VENV)/.installed
NO_TEST_EXTRAS := $(VENV)/.no-test-extras
# tools/check_cuda_build.sh (`make cuda-check`, which CI runs after `make test`): nvcc compiles csrc/cuda/*.cu,
# and the whole extension builds against a CUDA torch (about 5.5 GB) in its own venv; no GPU needed. The stamp
# skips it while nothing it reads has changed.
CUDA_VENV ?= .venv-cuda
CUDA_CHECKED := $(CUDA_VENV)/.checked

.PHONY: build test lint test-oldest-torch demo bench cuda-check clean distclean

build: $(INSTALLED)

# The lint first; the benchmarks run too, each case once (--benchmark-disable), so that they never rot.
test: lint $(INSTALLED)
	$(PY) -m pytest benchmarks/ -q --benchmark-disable
	$(PY) -m pytest -q

# ruff (rules and line length in pyproject.toml) comes with the test extras. Where they did not install (an
# offline GPU machine, see $(INSTALLED)), the lint is skipped with one line saying so; anywhere else (CI) a
# missing ruff is an error.
lint: $(INSTALLED)
	@if $(PY) -m ruff --version >/dev/null 2>&1; then echo '$(PY) -m ruff check .'; $(PY) -m ruff check .; \
	elif [ -n '$(HAVE_NVIDIA_GPU)' ] && [ -e $(NO_TEST_EXTRAS) ]; then \
	  echo "make lint: skipped: ruff is not installed (the test extras did not install: offline?)"; \
	else echo "make lint: ruff is not installed in $(VENV) (it comes with the test extras:" \
	  "$(PIP) install -e '.[test]' --no-build-isolation)" >&2; exit 1; fi

test-oldest-torch:
	OLDEST_TORCH=$(OLDEST_TORCH) bash tools/test_oldest_torch.sh

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

# With a GPU, .venv also sees the packages of $(PYTHON)'s own environment (a .pth file listing its
# site-packages; --system-site-packages would give the base interpreter's, not a venv's): its CUDA torch and
# triton are reused, nothing is downloaded.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(if $(HAVE_NVIDIA_GPU),$(PYTHON) -c 'import site; print("\n".join(site.getsitepackages()))' \
	  > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_fastddpm_parent_env.pth")

# The stamp holds the torch and triton requirements it installed: asking for others reinstalls.
ifneq ($(shell cat $(DEPS) 2>/dev/null),$(TORCH) $(TRITON))
.PHONY: $(DEPS)
endif
$(DEPS): | $(PY)
	$(PIP) install $(UPGRADE) pip setuptools wheel ninja
	if [ -n '$(TORCH)' ]; then $(PIP) install '$(TORCH)'; \
	elif ! $(PY) -c 'import torch' 2>/dev/null; then $(PIP) install torch; fi
	if [ -n '$(TRITON)' ]; then $(PIP) install '$(TRITON)'; \
	elif ! $(PY) -c 'import triton' 2>/dev/null; then $(PIP) install triton; fi
	echo '$(TORCH) $(TRITON)' > $@

# Offline (a GPU machine), the test extras may not install: then fastddpm alone, the tests that need a
# missing package (diffusers) skip, and $(NO_TEST_EXTRAS) tells `make lint` why ruff is missing.
$(INSTALLED): $(DEPS) setup.py pyproject.toml $(CSRC)
	rm -f $(NO_TEST_EXTRAS)
	$(PIP) install -e '.[test]' --no-build-isolation || { echo "make: the test extras did not install" \
	  "(offline?): installing fastddpm without them"; touch $(NO_TEST_EXTRAS); \
	  $(PIP) install -e . --no-build-isolation --no-deps; }
	touch $@

clean:
	rm -rf build *.egg-info fastddpm/_C*.so $(INSTALLED)
	find . \( -path ./$(VENV) -o -path ./$(CUDA_VENV) -o -path ./.venv-device -o -path ./.venv-oldest \) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(CUDA_VENV) .venv-device .venv-oldest
