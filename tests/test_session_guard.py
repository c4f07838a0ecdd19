"""A recipe started in the background outlives nothing that started it: the pytest process killed (SIGKILL,
so none of its hooks run), the recipe's whole session goes too (tests/session_guard.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import wait_for

TESTS = Path(__file__).resolve().parent


def alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_starter_takes_the_recipe_session_with_it(tmp_path: Path) -> None:
    # The starter does what conftest does for the background recipe: start_session, then other work. Its
    # command, like `rayembed run` starting a Ray cluster, leaves a grandchild running.
    starter = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(TESTS)!r})
        from recipes import start_session
        work = Path({str(tmp_path)!r})
        cmd = ["sh", "-c", "sleep 300 & echo $! > grandchild; wait"]
        proc = start_session(cmd, work, dict(os.environ), (work / "out", work / "err"))
        print(proc.pid, flush=True)
        time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    guard = int(proc.stdout.readline())
    mark = tmp_path / "grandchild"
    assert wait_for(lambda: mark.exists() and bool(mark.read_text().strip()), 30)
    grandchild = int(mark.read_text())
    assert alive(guard) and alive(grandchild)
    assert os.getsid(grandchild) == guard != os.getsid(proc.pid)  # the recipe's own session
    proc.kill()
    proc.wait()
    try:
        assert wait_for(lambda: not alive(grandchild) and not alive(guard), 15)
    finally:  # were the guard broken, the test would leave no sleeper behind either
        with contextlib.suppress(ProcessLookupError):
            os.killpg(guard, signal.SIGKILL)


def test_the_guard_passes_on_the_exit_status(tmp_path: Path) -> None:
    guard = [sys.executable, str(TESTS / "session_guard.py")]
    assert subprocess.run([*guard, "sh", "-c", "exit 3"]).returncode == 3
    assert subprocess.run([*guard, "sh", "-c", "kill -9 $$"]).returncode == 128 + 9
    assert subprocess.run([*guard, "true"]).returncode == 0
