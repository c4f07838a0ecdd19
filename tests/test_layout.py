"""The source root must not shadow the stdlib `platform` module."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_has_no_init() -> None:
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert (ROOT / "platform" / "rayembed" / "__init__.py").exists()


def test_import_platform_from_repo_root_is_stdlib() -> None:
    code = "import platform, sys; print(platform.__file__); print(platform.python_version())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path, version = out.split()
    assert not path.startswith(str(ROOT)), path
    assert version == ".".join(map(str, sys.version_info[:3]))


def test_top_level_layout() -> None:
    for name in ("pyproject.toml", "README.md", "platform", "jobs", "cluster", "tests", "docs", ".ci/run"):
        assert (ROOT / name).exists(), name
