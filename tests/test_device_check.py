"""tools/device_check.sh's plumbing, without a GPU: the script runs with PYTHON set to a stand-in interpreter
that answers its pip, pytest and version calls at once (and runs tools/bench_table.py for real).

The script runs only on scarce device time, so what it can get wrong there is checked here: that $OUT holds
few enough files with names the device tool returns, that the summary is written as it goes and printed
last, that a step past its time limit is cut and the rest skipped, and that the benchmark files merge into one
table.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "device_check.sh"

FAKE_PYTHON = textwrap.dedent('''\
    #!{python}
    """A stand-in for the device machine's python3."""
    import json, os, sys, time

    args = sys.argv[1:]
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps(args + ["PYTHONPATH=" + os.environ.get("PYTHONPATH", "")]) + "\\n")
    if args[0] == "-c":
        code = args[1]
        if "pytest_timeout" in code:
            sys.exit(1)  # not installed: the script runs pytest without --timeout
        print("9.0" if "get_device_capability" in code else "python 3.12 torch 2.11.0 cuda 13.0 | Fake H200")
        sys.exit(0)
    if args[0].endswith("bad_input_probe.py"):
        print("bad-input probe: 0 of 10 cases crashed")
        sys.exit(0)
    if args[:2] == ["-m", "pytest"]:
        if os.environ.get("FAKE_SLOW", "-") in args:
            time.sleep(60)
        if "--benchmark-json" in args:
            path = args[args.index("--benchmark-json") + 1]
            name = os.path.basename(path)[len("bench_"):-len(".json")]
            benchmarks = [{{"name": f"test_{{name}}[cuda-{{p}}]",
                           "params": {{"device": "cuda", "provider": p}}, "stats": {{"median": m}},
                           "extra_info": {{"per-call host (s)": 1.5e-5}}}}
                          for p, m in (("eager", 3e-3), ("compile", 2e-3), ("fastddpm", 1e-3))]
            with open(path, "w") as f:
                json.dump({{"datetime": "2026-11-29", "machine_info": {{}}, "benchmarks": benchmarks}}, f)
        print("3 passed in 0.01s")
        sys.exit(0)
    if args[:2] in (["-m", "pip"], ["-m", "fastddpm"]):
        print("ok")
        sys.exit(0)
    os.execv(sys.executable, [sys.executable] + args)  # tools/bench_table.py
''')


def run_script(tmp_path, **env):
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    calls = tmp_path / "calls"
    environment = dict(os.environ, PYTHON=str(fake), OUT=str(out), FAKE_CALLS=str(calls),
                       COMPUTE_SANITIZER="", DEVICE_CHECK_WHEELS=str(tmp_path / "no-wheels"))
    environment.update(env)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=120)
    return proc, out, [json.loads(line)[:-1] for line in calls.read_text().splitlines()]


def test_all_steps(tmp_path):
    proc, out, calls = run_script(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in out.iterdir())
    # The device tool returns at most eight files, named in letters, digits, '.', '_' and '-'.
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert files == ["bench_cifar_compile.json", "bench_gn.json", "bench_ops.json", "bench_sampling.json",
                     "bench_table.md", "bench_training.json", "device_check.log", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    steps = ["build", "info", "bad_inputs", "cuda_tests", "triton_kernels", "bench_sampling",
             "bench_training", "bench_ops", "bench_gn", "bench_cifar_compile"]
    for name in steps:
        assert re.search(rf"^{name} +rc=0 ", summary, re.M), summary
    assert "Fake H200" in summary and re.search(r"^memcheck +skipped: no compute-sanitizer", summary, re.M)
    # The steps ran in that order, each logged in full.
    log = (out / "device_check.log").read_text()
    assert [m for m in re.findall(r"^===== (\w+)", log, re.M)] == steps
    pytest_calls = [c for c in calls if c[:2] == ["-m", "pytest"]]
    assert any("-m" in c[2:] and "cuda" in c for c in pytest_calls)
    # The summary and then the merged table come last on stdout.
    table = (out / "bench_table.md").read_text()
    assert proc.stdout.rstrip().endswith(table.rstrip())
    for case in ("sampling", "training", "ops", "gn", "cifar_compile"):
        assert re.search(rf"^\| {case}\[cuda\] \| 3\.000 ms \| 2\.000 ms \| 1\.000 ms \| 3\.00 \| 2\.00 "
                         r"\| — \| — \| 15, 15 \|$", table, re.M), table
    assert proc.stdout.index("== device_check") < proc.stdout.index("| case |")


def test_budget_cuts_a_slow_step_and_skips_the_rest(tmp_path):
    proc, out, _ = run_script(tmp_path, DEVICE_CHECK_BUDGET="4", DEVICE_CHECK_MIN_STEP="1",
                              FAKE_SLOW="tests/")
    assert proc.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^cuda_tests +rc=124 .*TIMED OUT", summary, re.M), summary
    assert re.search(r"^triton_kernels +skipped: -?\d+s of the budget left", summary, re.M), summary
    assert not (out / "bench_table.md").exists()


@pytest.mark.parametrize("n", [1, 2])
def test_bench_table_merges_files(tmp_path, n):
    paths = []
    for i in range(n):
        data = {"datetime": "d", "machine_info": {}, "benchmarks": [
            {"name": f"test_case{i}[cpu-{p}]", "params": {"device": "cpu", "provider": p},
             "stats": {"median": 1e-3 * (k + 1)},
             "extra_info": {"bytes": 4_000_000} if p == "fastddpm" else {}}
            for k, p in enumerate(("fastddpm", "compile", "eager"))]}
        paths.append(tmp_path / f"b{i}.json")
        paths[-1].write_text(json.dumps(data))
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_table.py"), *map(str, paths)],
                         capture_output=True, text=True, check=True).stdout
    for i in range(n):
        assert f"| case{i}[cpu] | 3.000 ms | 2.000 ms | 1.000 ms | 3.00 | 2.00 | 4.0 | — |" in out


def test_steps_chosen(tmp_path):
    proc, out, calls = run_script(tmp_path, DEVICE_CHECK_STEPS="bench_ops memcheck")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    for name in ("build", "info", "bench_ops"):
        assert re.search(rf"^{name} +rc=0 ", summary, re.M), summary
    for name in ("bad_inputs", "cuda_tests", "triton_kernels", "bench_sampling", "bench_training",
                 "bench_cifar_compile"):
        assert re.search(rf"^{name} +not asked for", summary, re.M), summary
    assert re.search(r"^memcheck +skipped: no compute-sanitizer", summary, re.M)
    assert sorted(p.name for p in out.iterdir()) == ["bench_ops.json", "bench_table.md", "device_check.log",
                                                     "summary.txt"]


def test_carried_wheels_are_installed_first_and_seen_by_every_step(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"")
    proc, out, _ = run_script(tmp_path, DEVICE_CHECK_WHEELS=str(wheels), DEVICE_CHECK_STEPS="bench_ops")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^wheels +rc=0 ", summary, re.M), summary
    calls = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
    install = next(i for i, c in enumerate(calls) if c[:3] == ["-m", "pip", "install"] and "--target" in c)
    target = calls[install][calls[install].index("--target") + 1]
    assert str(wheels / "diffusers-0.42.1-py3-none-any.whl") in calls[install]
    assert all(c[-1].startswith(f"PYTHONPATH={target}") for c in calls[install + 1:]), calls
    assert any(c[:2] == ["-m", "pytest"] for c in calls[install + 1:])
