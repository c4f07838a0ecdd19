"""ruff and mypy, as configured in pyproject.toml, are part of the test run."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*argv: str) -> None:
    proc = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff() -> None:
    _run("ruff", "check", "platform", "tests")
    _run("ruff", "format", "--check", "platform", "tests")


def test_mypy(request: pytest.FixtureRequest) -> None:
    """mypy over `packages` as pyproject.toml sets them: started with the session (conftest.py), else here."""
    from conftest import MYPY

    started = request.config.stash.get(MYPY, None)
    if started is None:
        _run("mypy")
        return
    proc, log = started
    assert proc.wait(timeout=1800) == 0, log.read_text()
