"""Filesystems and readers shared by the jobs: local paths and s3:// (s3fs under pyarrow)."""

from __future__ import annotations

import atexit
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pyarrow.fs as pafs

if TYPE_CHECKING:
    import ray.data

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def ensure_ray(min_cpus: float = 1) -> None:
    """Connect to the running cluster (RAY_ADDRESS) or start a local one with room for the job.

    Logical CPUs are scheduling slots: a local cluster gets at least `min_cpus` of them even on a
    2-core machine, so training workers do not starve Ray Data's read tasks.
    """
    import ray

    if ray.is_initialized():
        return
    handler = signal.getsignal(signal.SIGTERM)
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(min_cpus)))
        atexit.register(stop_local_ray)  # runs before Ray's own atexit shutdown (registered earlier)
    if callable(handler) and threading.current_thread() is threading.main_thread():
        # ray.init puts its C++ failure handler on SIGTERM (it prints a stack and kills the process): the
        # CLI's own handler (stop Serve and Ray, exit 0) is put back
        signal.signal(signal.SIGTERM, handler)


def stop_local_ray() -> None:
    """Stop the local cluster this process started, Serve first: Serve's proxies stop the HAProxy
    processes they started, which a plain `ray.shutdown()` (killing the actors) would leave running,
    holding the endpoint's port."""
    import ray

    if not ray.is_initialized():
        return
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # no Serve on this cluster, or it is already gone
        pass
    ray.shutdown()


def local_abspath(path: str) -> str:
    """Absolute form of a local path; URIs (s3://...) unchanged. Ray workers run in their own folders."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def dated(path: str) -> str:
    """`path` with `{date}` as today's UTC date (YYYY-MM-DD): the nightly embed's folder per night."""
    return path.replace("{date}", time.strftime("%Y-%m-%d", time.gmtime()))


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def filesystem(path: str, endpoint_url: str | None = None) -> pafs.FileSystem | None:
    """A pyarrow filesystem for `path`: s3fs wrapped for s3://, None (local) otherwise.

    The endpoint comes from the argument or $AWS_ENDPOINT_URL (an S3-compatible server such as
    MinIO or moto); credentials follow the usual AWS chain.
    """
    if not is_s3(path):
        return None
    return pafs.PyFileSystem(pafs.FSSpecHandler(s3(endpoint_url)))


def s3(endpoint_url: str | None = None) -> Any:
    """An s3fs filesystem at `endpoint_url` or $AWS_ENDPOINT_URL (else AWS). No listings cache: a listing
    cached before another writer (Ray Train, an actor) added files would hide them from this process."""
    import s3fs

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    options = {"use_listings_cache": False}
    return s3fs.S3FileSystem(endpoint_url=endpoint, **options) if endpoint else s3fs.S3FileSystem(**options)


def open_file(path: str | os.PathLike[str], mode: str = "r", endpoint_url: str | None = None) -> IO[Any]:
    """A local file or s3:// object opened in `mode` (text modes as UTF-8). Writing a local file makes its
    folder; an s3:// object is stored when the file is closed."""
    p, text = str(path), {} if "b" in mode else {"encoding": "utf-8"}
    if is_s3(p):
        fs = s3(endpoint_url)
        if "r" in mode and not fs.isfile(strip_scheme(p)):
            raise FileNotFoundError(f"{p} does not exist")
        return fs.open(strip_scheme(p), mode, **text)
    if "w" in mode:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    return open(p, mode, **text)  # type: ignore[call-overload]  # noqa: SIM115


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """`base`/`parts...` for a local path or an s3:// URI (pathlib would fold `s3://` into `s3:/`)."""
    b = str(base)
    return "/".join([b.rstrip("/"), *parts]) if "://" in b else str(Path(b, *parts))


def is_file(path: str | os.PathLike[str], endpoint_url: str | None = None) -> bool:
    p = str(path)
    return bool(s3(endpoint_url).isfile(strip_scheme(p))) if is_s3(p) else Path(p).is_file()


def files_under(path: str | os.PathLike[str], suffix: str, endpoint_url: str | None = None) -> list[str]:
    """`path` if it is a file, else the files ending in `suffix` anywhere under the folder, sorted (s3://
    URIs as URIs); [] where there is nothing."""
    p = str(path)
    if is_file(p, endpoint_url):
        return [p]
    if is_s3(p):
        found = s3(endpoint_url).find(strip_scheme(p).rstrip("/") + "/")
        return sorted(f"s3://{f}" for f in found if f.endswith(suffix))
    return sorted(str(f) for f in Path(p).rglob(f"*{suffix}") if f.is_file())


def download_dir(uri: str, local: str | os.PathLike[str], endpoint_url: str | None = None) -> Path:
    """Copy an s3:// folder's files into a local folder (made if missing); FileNotFoundError if it has none."""
    root, fs = strip_scheme(uri).rstrip("/"), s3(endpoint_url)
    files = fs.find(root + "/")
    if not files:
        raise FileNotFoundError(f"{uri}: no files there")
    for f in files:
        dest = Path(local, f[len(root) + 1 :])
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f, str(dest))
    return Path(local)


def publish(write: Callable[[Path], Any], output_dir: str, endpoint_url: str | None = None) -> str:
    """Write a folder with `write(path)` at a local path or s3:// URI, replacing what was there."""
    if is_s3(output_dir):
        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp))
            upload_dir(tmp, output_dir, endpoint_url)
        return output_dir
    out = Path(output_dir)
    if out.exists():
        shutil.rmtree(out)
    write(out)
    return str(out)


def upload_dir(local: str | os.PathLike[str], uri: str, endpoint_url: str | None = None) -> None:
    """Copy a local folder to a local path or s3:// URI (replacing what is there); OSError if the store
    did not take every file (copy_dir)."""
    fs = filesystem(uri, endpoint_url) or pafs.LocalFileSystem()
    target = strip_scheme(uri)
    fs.create_dir(target, recursive=True)
    fs.delete_dir_contents(target, missing_dir_ok=True)
    copy_dir(local, fs, target)


def copy_dir(local: str | os.PathLike[str], fs: pafs.FileSystem, target: str) -> None:
    """Copy a local folder's files into `target` on `fs`, file by file, then check that each is there at
    its size; OSError otherwise. (pyarrow's copy_files into an fsspec filesystem such as s3fs reports
    success when the store refused every write: seen with S3 answering 503, no file written.)"""
    import shutil

    root = Path(local)
    files = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    for rel in sorted(files):
        dest = f"{target}/{rel}"
        fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        with open(root / rel, "rb") as src, fs.open_output_stream(dest) as out:
            shutil.copyfileobj(src, out, 8 << 20)
    there = fs.get_file_info([f"{target}/{rel}" for rel in sorted(files)])
    missing = [i.path for i, rel in zip(there, sorted(files), strict=True) if i.size != files[rel]]
    if missing:
        raise OSError(f"the store did not take {len(missing)} of {len(files)} files, e.g. {missing[0]}")


def strip_scheme(path: str) -> str:
    return path[len("s3://") :] if is_s3(path) else path


def detect_format(path: str, fs: pafs.FileSystem | None) -> str:
    """'json' or 'parquet', from the file's suffix or, for a folder, the first data file in it
    (paths under `_`/`.` names, such as an embed output's _manifest.json, are metadata, not data)."""
    for suffix, fmt in FORMATS.items():
        if path.endswith(suffix):
            return fmt
    fs = fs or pafs.LocalFileSystem()
    infos = fs.get_file_info(pafs.FileSelector(strip_scheme(path), recursive=True, allow_not_found=True))
    root = strip_scheme(path).rstrip("/")
    for info in sorted(infos, key=lambda i: i.path):
        if any(part[:1] in "_." for part in info.path[len(root) :].split("/") if part):
            continue
        for suffix, fmt in FORMATS.items():
            if info.path.endswith(suffix):
                return fmt
    raise FileNotFoundError(f"no .jsonl/.json/.parquet input found at {path}")


def read_dataset(path: str, endpoint_url: str | None = None, **kw: Any) -> ray.data.Dataset:
    """Ray Dataset over a JSONL or Parquet file or folder, local or s3://."""
    import ray.data

    fs = filesystem(path, endpoint_url)
    if fs is None and not os.path.exists(path):
        raise FileNotFoundError(f"input {path} does not exist")
    fmt = detect_format(path, fs)
    target = strip_scheme(path) if fs is not None else os.path.abspath(path)
    if fmt == "parquet":
        # Ray Data's first reader (V1): 2.60's default DataSourceV2 Parquet read spends ~4 s in its
        # ListFiles step per execution, waiting with the CPU idle, however small the data (0.2 s here
        # with V1; docs/benchmarks.md). The choice is made when the read is planned, i.e. now.
        context = ray.data.DataContext.get_current()
        v2, context.use_datasource_v2 = context.use_datasource_v2, False
        try:
            return ray.data.read_parquet(target, filesystem=fs, file_extensions=["parquet"], **kw)
        finally:
            context.use_datasource_v2 = v2
    # pyarrow's JSON-lines reader keeps id strings as strings (the pandas one would make "4983" an int).
    return ray.data.read_json(target, filesystem=fs, **kw)
