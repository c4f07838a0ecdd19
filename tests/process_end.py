"""How the test process ends (a pytest plugin; conftest imports its hooks).

After the suite's ~350 tests the process holds what they leave behind: Ray's core worker (shut down),
Ray Data's prefetcher threads, a W&B service torn down and restarted, OpenTelemetry exporter threads, a
tracker thread stuck on the hung store a test starts. Once, in CI, CPython's own finalization of all that
crashed: exit 139 (SIGSEGV) after "346 passed"; the 2 full runs here before this did not. So once pytest has
reported and every atexit hook has run (Ray's shutdown, W&B's teardown, OpenTelemetry's flush, and any a
test registers), the process exits with pytest's status through `os._exit`, skipping only the interpreter's
teardown of modules and leftover threads. A process that stops before its session ends exits as usual.
tests/test_process_end.py checks that a failing run still exits 1 and that atexit hooks still run.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import Any

import pytest

_sessions: list[Any] = []


def _exit_with_pytests_status() -> None:
    if _sessions:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed stream has nothing left to write
                stream.flush()
        os._exit(int(_sessions[-1].exitstatus))


atexit.register(_exit_with_pytests_status)  # registered first, so it runs after every other atexit hook


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    _sessions.append(session)  # its exitstatus is read at exit, after every plugin had its say
