"""Models on S3: fetched once per node into a local cache keyed by their content.

`fetch_model("s3://bucket/models/m")` lists the folder (every object's key, size and ETag), hashes that
listing into a key, and copies the folder to `<cache>/<key>` unless it is there. Concurrent callers on a
node (Ray Data actors, Serve replicas, train workers) take one file lock, so one copies and the others
wait and reuse it; a copy lands in a temporary folder renamed into place, so a crash never leaves half a
model under its key. A changed model (any file rewritten) gets a new key; the old copy stays until the
cache is cleared. The cache is `$RAYEMBED_MODEL_CACHE`, else `~/.cache/rayembed/models`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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
    from filelock import FileLock

    files = listing(uri, endpoint_url)
    if "config.json" not in files:
        raise FileNotFoundError(
            f"model {uri!r} not found: expected a folder with config.json on S3 (found {len(files)} files)"
        )
    key = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()[:20]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target, done = root / key, root / f"{key}.complete"  # the marker sits beside it, not in the model
    with FileLock(str(root / f"{key}.lock")):
        if done.is_file() and target.is_dir():
            return target
        fs, src = s3(endpoint_url), strip_scheme(uri).rstrip("/")
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            for rel in files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{src}/{rel}", str(tmp / rel))
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            done.write_text(json.dumps({"source": uri, "files": len(files)}))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
