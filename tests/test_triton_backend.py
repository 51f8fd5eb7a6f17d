"""The foundation tests of Diffusion (tests/test_diffusion.py), run again with every op on the Triton backend
(FASTDDPM_BACKEND=triton: CPU tensors through the Triton interpreter, noise drawn in-kernel)."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_diffusion_suite_passes_on_the_triton_backend():
    env = {**os.environ, "FASTDDPM_BACKEND": "triton", "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_diffusion.py"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
