"""cluster/Dockerfile's steps replayed as the base image's non-root user (no container daemon here).

The Ray base image runs as `ray` (uid 1000, group `users` = gid 100). The replay walks the Dockerfile in
a scratch root: `RUN mkdir` as that user, `WORKDIR` creating a missing folder as root (as Docker does),
`COPY` giving files to root unless `--chown` says otherwise, and the package's `pip install` run as uid
1000 (offline: --no-deps into a scratch target, the build in place as the image does it). A COPY without
--chown, or a build folder the user cannot write, fails here as it fails in `docker build`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UID, GID = 1000, 100

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="replaying as another user needs root")


def steps(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def replay(dockerfile: str, root: Path) -> subprocess.CompletedProcess[str] | None:
    """Run the Dockerfile's steps under `root`; the package install's result (None if it has none)."""
    home = root / "home" / "ray"
    home.mkdir(parents=True)
    os.chown(home, UID, GID)
    workdir, result = root, None
    for op, arg in steps(dockerfile):
        if op == "RUN" and arg.startswith("mkdir"):
            for path in shlex.split(arg)[2:]:
                subprocess.run(["mkdir", "-p", str(root / path.lstrip("/"))], check=True, user=UID, group=GID)
        elif op == "WORKDIR":
            workdir = root / arg.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)  # as root, if it was missing
        elif op == "COPY":
            words = shlex.split(arg)
            owner = next((w.split("=", 1)[1] for w in words if w.startswith("--chown=")), None)
            *sources, dest = [w for w in words if not w.startswith("--")]
            copy(sources, workdir / dest, (UID, GID) if owner == "ray:users" else (0, 0))
        elif op == "RUN" and "pip install" in arg and "torch==" not in arg:
            python, env = user_python()
            cmd = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                   "--no-cache-dir", "--target", str(home / "site-packages"), "."]  # fmt: skip
            env |= {"HOME": str(home)}
            result = subprocess.run(
                cmd, cwd=workdir, user=UID, group=GID, env=env, capture_output=True, text=True
            )
    return result


def user_python() -> tuple[str, dict[str, str]]:
    """An interpreter uid 1000 can run, with this environment's pip and setuptools (site-packages are
    world-readable; this interpreter may sit under root's 0700 home, the system one does not)."""
    site = next(p for p in sys.path if p.endswith("site-packages"))
    # Debian's system Python patches distutils; setuptools must not swap in its own over it
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": site, "SETUPTOOLS_USE_DISTUTILS": "stdlib"}
    for python in (sys.executable, f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"):
        try:
            probe = subprocess.run([python, "-c", "import pip, setuptools"], user=UID, group=GID, env=env)
        except OSError:  # not executable for that user
            continue
        if probe.returncode == 0:
            return python, env
    raise AssertionError(
        f"no Python {sys.version_info[:2]} that uid {UID} can run: cannot replay the install"
    )


def copy(sources: list[str], dest: Path, owner: tuple[int, int]) -> None:
    for src in sources:
        path = ROOT / src
        target = dest / path.name if dest.is_dir() or str(dest).endswith("/") or len(sources) > 1 else dest
        if path.is_dir():
            target = dest if len(sources) == 1 else dest / path.name
            shutil.copytree(
                path, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        for p in [target, *target.rglob("*")] if target.is_dir() else [target]:
            os.chown(p, *owner)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A scratch root uid 1000 can reach (pytest's tmp_path sits under a 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="rayembed-image-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_image_installs_as_the_base_images_user(scratch: Path) -> None:
    result = replay((ROOT / "cluster" / "Dockerfile").read_text(), scratch)
    assert result is not None, "the Dockerfile installs no package"
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        scratch / "home/ray/site-packages/rayembed/serve/deployment.py"
    ).is_file()  # the base image's Python is the user's


def test_the_replay_fails_as_docker_does_without_chown(scratch: Path) -> None:
    text = (ROOT / "cluster" / "Dockerfile").read_text().replace("--chown=ray:users ", "")
    result = replay(text, scratch)
    assert result is not None and result.returncode != 0
    assert "permission denied" in result.stderr.lower(), result.stderr[-2000:]


def test_the_image_sets_the_ray_serve_settings_import_rayembed_sets() -> None:
    """The image's ENV and `import rayembed` agree on every RAY_SERVE_* setting (the image sets them for
    processes that never import rayembed, e.g. `serve deploy` on a RayService)."""
    text = (ROOT / "cluster" / "Dockerfile").read_text().replace("\\\n", " ")
    env = " ".join(line[4:] for line in text.splitlines() if line.startswith("ENV "))
    image = dict(part.split("=", 1) for part in shlex.split(env))
    source = (ROOT / "platform" / "rayembed" / "__init__.py").read_text()
    package = dict(re.findall(r'os\.environ\.setdefault\("(RAY_SERVE_\w+)", "([^"]*)"\)', source))
    assert len(package) >= 5
    assert {k: v for k, v in image.items() if k.startswith("RAY_SERVE_")} == package
