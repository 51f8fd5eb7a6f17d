"""Builds fastddpm and its C++ extension fastddpm._C (csrc/), and installs kernels/ as fastddpm.kernels.

    pip install -e . --no-build-isolation    # torch must already be installed: it is no build dependency

The CPU sources (csrc/fastddpm.cpp, csrc/cpu/*.cpp) are always built. The CUDA sources (csrc/cuda/*.cu and
csrc/cuda/*_binding.cpp) are built when nvcc is found and torch is a CUDA build; FASTDDPM_CUDA=0 skips them,
FASTDDPM_CUDA=1 requires them. TORCH_CUDA_ARCH_LIST picks the GPU architectures (default: the visible GPUs',
else 8.0;9.0). MAX_JOBS caps ninja's parallel compiles.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("fastddpm setup: torch must be installed before fastddpm is built, and the build must see it: "
             "install torch first, then `pip install -e . --no-build-isolation` (or just run `make`)")

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100, H100


def sources(*patterns):
    paths = (p for pattern in patterns for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def build_cuda():
    """(whether to compile csrc/cuda/, why): auto-detected, or forced by FASTDDPM_CUDA=0|1."""
    wanted = os.environ.get("FASTDDPM_CUDA", "").strip()
    if wanted not in ("", "0", "1"):
        sys.exit(f"fastddpm setup: FASTDDPM_CUDA must be 0 or 1, got {wanted!r}")
    if wanted == "0":
        return False, "FASTDDPM_CUDA=0"
    if torch.version.cuda is None:
        if wanted == "1":
            sys.exit(f"fastddpm setup: FASTDDPM_CUDA=1 but torch {torch.__version__} is a CPU-only build "
                     "(torch.version.cuda is None), which cannot build CUDA extensions; install a CUDA build "
                     "of torch, or unset FASTDDPM_CUDA to build the CPU extension only")
        return False, f"torch {torch.__version__} is a CPU-only build"
    if find_nvcc() is None:
        if wanted == "1":
            sys.exit("fastddpm setup: FASTDDPM_CUDA=1 but no nvcc: put it on PATH or set CUDA_HOME")
        return False, "nvcc not found"
    return True, f"nvcc and torch {torch.__version__} (CUDA {torch.version.cuda})"


def cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST normalised to "8.0;9.0"; set from the visible GPUs or the default when unset."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";").split(";")
    archs = [a for a in archs if a]
    if not archs and torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        archs = [f"{major}.{minor}" for major, minor in sorted(caps)]
    archs = ";".join(archs) or DEFAULT_CUDA_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # what torch's nvcc flags use
    return archs


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension (ninja, MAX_JOBS), compiling in build/temp rather than a fresh temporary folder
    on each pip install, so that ninja rebuilds only what changed."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp")


def extension():
    cpp_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    with_cuda, why = build_cuda()
    cuda_sources = sources("csrc/cuda/*.cu", "csrc/cuda/*_binding.cpp") if with_cuda else []
    # at::parallel_for runs on OpenMP in the Linux torch builds; without -fopenmp it runs serially.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []
    # -g0 drops the -g that Python's own CFLAGS add: a quarter of the compile time.
    cxx = ["-O3", "-g0", "-std=c++20", *openmp]
    # depends: a header edit rebuilds too (ninja then recompiles only the files that include it).
    headers = sources("csrc/**/*.h", "csrc/**/*.cuh")
    kwargs = dict(extra_link_args=openmp, py_limited_api=True, depends=headers)
    if not cuda_sources:
        why = why if not with_cuda else "no sources in csrc/cuda/"
        print(f"fastddpm setup: building fastddpm._C for the CPU only ({why})", file=sys.stderr)
        return CppExtension("fastddpm._C", cpp_sources, extra_compile_args={"cxx": cxx}, **kwargs)
    archs = cuda_arch_list()
    print(f"fastddpm setup: building fastddpm._C for the CPU and CUDA {archs} ({why})", file=sys.stderr)
    cxx += ["-DFASTDDPM_WITH_CUDA=1", f'-DFASTDDPM_CUDA_ARCHS="{archs}"']
    nvcc = ["-O3", "-std=c++20"]
    return CUDAExtension("fastddpm._C", cpp_sources + cuda_sources,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)


setup(
    name="fastddpm",
    version="0.1.0",
    description="Denoising Diffusion Probabilistic Models with fused Triton and C++ kernels",
    python_requires=">=3.10",
    packages=(find_packages(include=["fastddpm", "fastddpm.*"]) + ["fastddpm.kernels"]
              + [f"fastddpm.kernels.{p}" for p in find_packages(where="kernels")]),
    package_dir={"fastddpm.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    install_requires=["numpy", "tqdm", "safetensors", "pillow", "scikit-learn", "matplotlib"],
    # diffusers: tests/test_diffusers_schedulers.py and tests/test_patch.py compare against the release the
    # schedulers follow; ruff: `make lint` (pinned: a new release may add checks to the selected rule sets)
    extras_require={"test": ["pytest", "pytest-benchmark", "diffusers>=0.42,<0.43", "ruff==0.16.9"]},
    entry_points={"console_scripts": ["fastddpm = fastddpm.cli:main"]},
)
