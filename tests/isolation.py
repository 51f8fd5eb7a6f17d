"""Tests marked ``isolated`` run in child processes, so that a test that kills the interpreter (a kernel
crashing on bad input) fails alone instead of taking pytest, or a pytest-xdist worker, down with it.

The isolated tests of one module that this process is about to run go to one child, ``python -m pytest
<node ids>``, which streams each test's reports back through a file (serialised with the hooks pytest-xdist
uses); the parent replays them as its own, so they show, count and fail as usual. A child that dies fails
the test it was in, naming the signal and the child's last output, and the tests after it run in a new child.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest
from _pytest.reports import TestReport

# Set in a child: the file its reports go to. A child runs its tests in-process.
CHILD_ENV = "FASTDDPM_ISOLATED_REPORTS"
MARKER = "isolated"


def register(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(alone=False): run in a child process (a crash fails this "
                                       "test only); alone=True: in a child of its own")
    path = os.environ.get(CHILD_ENV)
    config.pluginmanager.register(_Child(config, path) if path else _Parent(config), "fastddpm-isolation")


class _Child:
    """Writes a line per test start and per report, flushed at once: a crash loses nothing written before
    it."""

    def __init__(self, config: pytest.Config, path: str):
        self.config = config
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (open for the whole session)

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def pytest_runtest_logstart(self, nodeid, location):
        self._write({"start": nodeid})

    def pytest_runtest_logreport(self, report):
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self._write({"report": data})


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {-returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


class _Parent:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.done: dict[str, list[TestReport]] = {}  # node id -> its reports, from a child

    @staticmethod
    def _isolated(item) -> bool:
        # (a test skipped by a mark needs no child: pytest skips it here as usual)
        return item.get_closest_marker(MARKER) is not None and item.get_closest_marker("skip") is None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        if not self._isolated(item):
            return None
        if item.nodeid not in self.done:
            self._run_batch(item)
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for report in self.done.pop(item.nodeid):
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        # What this process set up for the tests before (module and session fixtures) and nextitem does not
        # need is torn down here, as the teardown of a test run in-process would.
        item.session._setupstate.teardown_exact(nextitem)
        return True

    def _batch(self, item) -> list:
        """item and the isolated tests of its module after it (as this process will run them); a test marked
        ``isolated(alone=True)`` (one that leaves its process unusable even when it passes, e.g. after a CUDA
        device-side assert) runs in a child of its own."""
        if _alone(item):
            return [item]
        items = item.session.items
        start = items.index(item)
        return [i for i in items[start:]
                if i.path == item.path and self._isolated(i) and not _alone(i) and i.nodeid not in self.done]

    def _run_batch(self, item) -> None:
        pending = {i.nodeid: i for i in self._batch(item)}
        while pending:
            records, returncode, output = self._run_child(list(pending))
            started = None
            for record in records:
                if "start" in record:
                    started = record["start"]
                    continue
                report = self.config.hook.pytest_report_from_serializable(config=self.config,
                                                                          data=record["report"])
                self.done.setdefault(report.nodeid, []).append(report)
                if report.when == "teardown":
                    pending.pop(report.nodeid, None)
                    started = None
            if started is not None and started in pending:  # the child died inside this test
                self.done.setdefault(started, []).append(
                    self._crash_report(pending.pop(started), returncode, output))
            elif pending and not records:  # nothing ran (a collection error, say): fail them all
                for nodeid, it in pending.items():
                    self.done[nodeid] = [self._crash_report(it, returncode, output)]
                pending.clear()
            elif pending and returncode >= 0:  # the child ended normally yet skipped some: do not loop
                for nodeid, it in pending.items():
                    self.done.setdefault(nodeid, []).append(self._crash_report(it, returncode, output))
                pending.clear()

    def _run_child(self, nodeids: list[str]) -> tuple[list[dict], int, str]:
        with tempfile.TemporaryDirectory(prefix="fastddpm-isolated-") as tmp:
            path = os.path.join(tmp, "reports.jsonl")
            open(path, "w").close()
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                   "-o", "addopts=", "--rootdir", str(self.config.rootpath), *nodeids]
            proc = subprocess.run(cmd, cwd=self.config.rootpath, env={**os.environ, CHILD_ENV: path},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace")
            with open(path, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.endswith("\n")]
        return records, proc.returncode, proc.stdout

    @staticmethod
    def _crash_report(item, returncode: int, output: str) -> TestReport:
        lines = output.splitlines()
        # faulthandler's report (pytest enables it) starts with the innermost Python frames: show those
        fatal = next((i for i, line in enumerate(lines) if "Fatal Python error" in line), None)
        shown = lines[fatal:fatal + 16] if fatal is not None else lines[-30:]
        longrepr = (f"{item.nodeid}: the child process running it ended with {_signal_name(returncode)} "
                    "before the test finished. Its output:\n" + "\n".join(shown))
        keywords = {k: 1 for k in item.keywords}
        return TestReport(item.nodeid, item.location, keywords, "failed", longrepr, "call")


def _alone(item) -> bool:
    marker = item.get_closest_marker(MARKER)
    return bool(marker and marker.kwargs.get("alone"))
