"""Models on S3: fetched once per node into a local cache keyed by their content.

`fetch_model("s3://bucket/models/m")` lists the folder (every object's key, size and ETag), hashes that
listing into a key, and copies the folder to `<cache>/<key>` unless it is there. Concurrent callers on a
node (Ray Data actors, Serve replicas, train workers) take one file lock, so one copies and the others
wait and reuse it; a copy lands in a temporary folder renamed into place, so a crash never leaves half a
model under its key. A changed model (any file rewritten) gets a new key; the old copy stays until the
cache is cleared. The cache is `$RAYEMBED_MODEL_CACHE`, else `~/.cache/rayembed/models`.

A registered model (`models:/<name>/<version>` or `models:/<name>@<alias>`) is fetched the same way, keyed
by the registry and its version (`fetch_registered`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from rayembed.io import s3, strip_scheme


def cache_root() -> Path:
    return Path(os.environ.get("RAYEMBED_MODEL_CACHE", "~/.cache/rayembed/models")).expanduser()


def listing(uri: str, endpoint_url: str | None = None) -> dict[str, tuple[int, str]]:
    """Relative path -> (size, ETag) of every object under the folder `uri`."""
    fs = s3(endpoint_url)
    root = strip_scheme(uri).rstrip("/")
    found = fs.find(root, detail=True)
    return {
        path[len(root) + 1 :]: (int(info["size"]), str(info.get("ETag", "")).strip('"'))
        for path, info in found.items()
        if info.get("type") == "file"
    }


def fetch_model(uri: str, endpoint_url: str | None = None) -> Path:
    """The local copy of the model folder at `uri` (s3://), fetched if this node has none."""
    files = listing(uri, endpoint_url)
    if "config.json" not in files:
        raise FileNotFoundError(
            f"model {uri!r} not found: expected a folder with config.json on S3 (found {len(files)} files)"
        )
    key = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()[:20]

    def copy(tmp: Path) -> None:
        fs, src = s3(endpoint_url), strip_scheme(uri).rstrip("/")
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{src}/{rel}", str(tmp / rel))

    return cached(key, uri, copy)


def fetch_registered(uri: str) -> Path:
    """The local copy of a registered model version (`models:/<name>/<version>` or `@<alias>`, MLflow's
    registry): an alias is resolved to its version now, and a version's files never change, so the
    cache key is the registry's, name and version (a moved alias fetches the new version)."""
    from rayembed.tracking.mlflow_backend import download, registered, tracking_uri

    version = registered(uri)
    source = f"{tracking_uri()}|{version.name}|{version.version}"
    key = "registry-" + hashlib.sha256(source.encode()).hexdigest()[:20]

    def copy(tmp: Path) -> None:
        got = Path(download(version, str(tmp / ".download")))
        if not (got / "config.json").is_file():
            raise FileNotFoundError(f"model {uri!r} (version {version.version}) has no config.json")
        for item in got.iterdir():
            item.rename(tmp / item.name)
        shutil.rmtree(tmp / ".download")

    return cached(key, f"models:/{version.name}/{version.version}", copy)


def registered_revision(path: Path) -> str | None:
    """'models:/<name>/<version>' when `path` is a cached registered version, else None."""
    marker = path.parent / f"{path.name}.complete"
    if not path.name.startswith("registry-") or not marker.is_file():
        return None
    return str(json.loads(marker.read_text())["source"])


def cached(key: str, source: str, copy: Callable[[Path], None]) -> Path:
    """`<cache>/<key>`, filled by `copy(tmp folder)` by one process of the node while the others wait."""
    from filelock import FileLock

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target, done = root / key, root / f"{key}.complete"  # the marker sits beside it, not in the model
    with FileLock(str(root / f"{key}.lock")):
        if done.is_file() and target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            copy(tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            done.write_text(json.dumps({"source": source}))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
