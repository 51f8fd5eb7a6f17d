"""The setup commands: `make test` stays within the CPU setup; CI runs the CUDA build check after it."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_does_not_run_the_cuda_build_check(tmp_path):
    # With a CUDA venv that was never checked (no stamp), `make cuda-check` runs the check; `make test` not.
    env_venv = str(tmp_path / "cuda-venv")
    dry = subprocess.run(["make", "-n", "test", f"CUDA_VENV={env_venv}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "pytest" in dry.stdout and "check_cuda_build" not in dry.stdout
    check = subprocess.run(["make", "-n", "cuda-check", f"CUDA_VENV={env_venv}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert "check_cuda_build.sh" in check.stdout


def test_ci_runs_the_cuda_build_check_after_the_tests():
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands.index("make test") < commands.index("make cuda-check")
