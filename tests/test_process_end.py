"""The suite's process ends through tests/process_end.py: pytest's exit status survives it, atexit hooks
registered by the tests still run before it, and the interpreter's teardown (a module's objects
finalized) does not run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

TESTS = """
import atexit, os, pathlib

def _mark():
    pathlib.Path("{mark}").write_text("ran")

class Left:
    def __init__(self):  # what __del__ needs, held: a module's globals may be gone when it runs
        self.fd, self.write = os.open("{mark}-finalized", os.O_WRONLY | os.O_CREAT), os.write

    def __del__(self):
        self.write(self.fd, b"finalized")

LEFT = Left()  # finalized in the interpreter's teardown of this module, if it runs

def test_it():
    atexit.register(_mark)
    assert {outcome}
"""


def _suite(tmp_path: Path, outcome: str) -> Path:
    """A one-test suite in `tmp_path` whose test passes or fails (`outcome`); the path its marks start with."""
    mark = tmp_path / "atexit-ran"
    (tmp_path / "test_one.py").write_text(TESTS.format(mark=mark, outcome=outcome))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    return mark


@pytest.mark.parametrize("outcome, status", [("True", 0), ("False", 1)])
def test_exit_status_is_pytests_and_atexit_hooks_run(tmp_path: Path, outcome: str, status: int) -> None:
    mark = _suite(tmp_path, outcome)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "process_end", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env={"PYTHONPATH": str(HERE), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == status, done.stdout + done.stderr
    assert ("1 passed" if status == 0 else "1 failed") in done.stdout  # the report was flushed out
    assert mark.read_text() == "ran"  # the test's atexit hook ran before the process ended
    assert Path(f"{mark}-finalized").read_text() == ""  # the interpreter's teardown was skipped


def test_without_the_plugin_the_interpreters_teardown_runs(tmp_path: Path) -> None:
    """The check above can fail: a plain run finalizes the module's objects."""
    mark = _suite(tmp_path, "True")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)], cwd=tmp_path,
                   env={"PATH": "/usr/bin:/bin"}, capture_output=True, timeout=120, check=True)  # fmt: skip
    assert Path(f"{mark}-finalized").read_text() == "finalized"
