"""The isolation of tests marked ``isolated`` (tests/isolation.py): a crash fails that test alone."""
import subprocess
import sys
import textwrap

CRASHING_MODULE = '''
import ctypes
import os

import pytest


@pytest.fixture(scope="module")
def module_resource():
    return []


def test_not_isolated_first(module_resource):
    module_resource.append(1)


@pytest.mark.isolated
def test_passes_before():
    assert os.environ.get("FASTDDPM_ISOLATED_REPORTS")  # in a child


@pytest.mark.isolated
@pytest.mark.parametrize("n", [1, 2])
def test_crashes(n):
    if n == 2:
        ctypes.string_at(0)  # SIGSEGV


@pytest.mark.isolated
def test_fails_after():
    assert 1 == 2


@pytest.mark.isolated
@pytest.mark.skip(reason="skipped by a mark")
def test_skipped():
    pass


@pytest.mark.isolated
def test_passes_after():
    pass


def test_not_isolated(module_resource):
    assert "FASTDDPM_ISOLATED_REPORTS" not in os.environ and module_resource == [1]
'''


CONFTEST = textwrap.dedent('''
    import sys
    sys.path.insert(0, %r)
    from tests.isolation import register

    def pytest_configure(config):
        register(config)
''' % str(__import__("pathlib").Path(__file__).resolve().parents[1]))


def test_a_crash_fails_one_test_and_the_rest_run(tmp_path):
    """Run a module whose second case segfaults: that case fails naming SIGSEGV, the tests after it run in a
    new child and report as usual, and the parent survives, with its module fixtures set up and torn down
    around the isolated tests as usual."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_crash.py").write_text(CRASHING_MODULE)
    (tmp_path / "test_next_module.py").write_text("def test_in_the_next_module():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                           "test_crash.py", "test_next_module.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "2 failed, 6 passed, 1 skipped" in out, out
    assert "FAILED test_crash.py::test_crashes[2]" in out and "SIGSEGV" in out, out
    assert "FAILED test_crash.py::test_fails_after" in out and "assert 1 == 2" in out, out
    assert "PASSED test_next_module.py::test_in_the_next_module" in out, out
    for name in ("test_not_isolated_first", "test_passes_before", "test_crashes[1]", "test_passes_after",
                 "test_not_isolated"):
        assert f"PASSED test_crash.py::{name}" in out, out


ALONE_MODULE = '''
import os

import pytest


@pytest.mark.isolated(alone=True)
@pytest.mark.parametrize("n", [1, 2])
def test_alone(n):
    with open(os.environ["PIDS"], "a") as f:
        f.write(f"alone {os.getpid()}\\n")


@pytest.mark.isolated
@pytest.mark.parametrize("n", [1, 2])
def test_shared(n):
    with open(os.environ["PIDS"], "a") as f:
        f.write(f"shared {os.getpid()}\\n")
'''


def test_alone_runs_each_test_in_a_child_of_its_own(tmp_path):
    """isolated(alone=True): one child per test (a test that leaves its process unusable even when it
    passes); the plain isolated tests of the module share one child."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_alone.py").write_text(ALONE_MODULE)
    pids = tmp_path / "pids"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_alone.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PIDS": str(pids)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = [line.split() for line in pids.read_text().splitlines()]
    alone = {pid for kind, pid in seen if kind == "alone"}
    shared = {pid for kind, pid in seen if kind == "shared"}
    assert len(seen) == 4 and len(alone) == 2 and len(shared) == 1 and not alone & shared, seen
