"""Exactly-once bookkeeping for the embed job: input fragments, deterministic outputs, commit markers.

Every input fragment (a JSONL file or a line-aligned byte range of a big one, or a run of row groups of a
Parquet file) has a key and one output name derived from it. A fragment is *committed* when `_committed/<name>.json` exists; that marker is
written last, after the Parquet file (and its rejects file) were moved into place, so a crash at any
point leaves either a committed fragment or one that a rerun redoes from scratch. `_manifest.json`
records the settings that shape the vectors (model, revision, dim, precision, ...); a rerun with other
settings into the same folder is refused.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayembed.io import FORMATS

MANIFEST = "_manifest.json"
COMMITTED = "_committed"
REJECTS = "_rejects"
TMP = "_tmp"


@dataclass(frozen=True)
class Fragment:
    """One unit of work: `path` (filesystem path, no scheme) and, for Parquet, row groups [start, stop);
    for a JSONL file bigger than `fragment_bytes`, the lines that start in bytes [start, stop)."""

    path: str
    key: str
    fmt: str
    row_groups: tuple[int, int] | None = None
    rows: int | None = None
    byte_range: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        """Output file name: a stable function of the key, so a redo overwrites rather than duplicates."""
        stem = posixpath.splitext(posixpath.basename(self.path))[0][:40]
        return f"{stem}-{hashlib.sha1(self.key.encode()).hexdigest()[:12]}.parquet"


def list_fragments(
    root: str, fs: pafs.FileSystem, fragment_rows: int, fragment_bytes: int = 1 << 62
) -> list[Fragment]:
    """Input files under `root` (or `root` itself): Parquet split into row-group runs of >= fragment_rows,
    JSONL bigger than fragment_bytes into byte ranges of that size (a line belongs to the range it starts in)."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {root} does not exist")
    if info.type == pafs.FileType.File:
        files, base = [info], posixpath.dirname(root)
    else:
        files = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        base = root
    out = fragments_of(files, base, fs, fragment_rows, fragment_bytes)
    if not out:
        raise FileNotFoundError(f"no .jsonl/.json/.parquet input found at {root}")
    return out


def fragments_of(
    files: list[pafs.FileInfo],
    base: str,
    fs: pafs.FileSystem,
    fragment_rows: int,
    fragment_bytes: int = 1 << 62,
) -> list[Fragment]:
    """The fragments of these files (keys relative to `base`): see list_fragments."""
    out: list[Fragment] = []
    for f in sorted(files, key=lambda i: i.path):
        fmt = next((v for k, v in FORMATS.items() if f.path.endswith(k)), None)
        name = posixpath.basename(f.path)
        if f.type != pafs.FileType.File or fmt is None or name.startswith(("_", ".")):
            continue
        rel = posixpath.relpath(f.path, base) if base else f.path
        if fmt == "json":
            if f.size is None or f.size <= fragment_bytes:
                out.append(Fragment(f.path, rel, fmt))
                continue
            for start in range(0, f.size, fragment_bytes):
                stop = min(start + fragment_bytes, f.size)
                out.append(Fragment(f.path, f"{rel}#b{start}-{stop}", fmt, byte_range=(start, stop)))
            continue
        with fs.open_input_file(f.path) as fh:
            meta = pq.ParquetFile(fh).metadata
        start, rows = 0, 0
        for g in range(meta.num_row_groups):
            rows += meta.row_group(g).num_rows
            if rows >= fragment_rows or g == meta.num_row_groups - 1:
                out.append(Fragment(f.path, f"{rel}#rg{start}-{g + 1}", fmt, (start, g + 1), rows))
                start, rows = g + 1, 0
    return out


def read_lines(fs: pafs.FileSystem, frag: Fragment, block: int = 1 << 20) -> bytes:
    """The bytes of the whole lines that start inside `frag.byte_range` (the whole file if it has none)."""
    if frag.byte_range is None:
        with fs.open_input_stream(frag.path) as f:
            return bytes(f.read())
    start, stop = frag.byte_range
    with fs.open_input_file(frag.path) as f:
        size = f.size()
        first = max(start - 1, 0)  # from the byte before: a line starting exactly at `start` is ours
        buf = bytearray(f.read_at(stop - first, first))
        look = stop - first - 1  # the line running through byte stop-1 is ours: read on to its end
        while (end := buf.find(b"\n", look)) < 0 and first + len(buf) < size:
            look = len(buf)
            buf += f.read_at(min(block, size - first - len(buf)), first + len(buf))
    if end >= 0:
        del buf[end + 1 :]  # lines starting at or after `stop` belong to the next range
    if start > 0:
        cut = buf.find(b"\n")  # the line in progress at `start` belongs to the previous range
        del buf[: cut + 1 if cut >= 0 else len(buf)]
    return bytes(buf)


def open_output(
    root: str,
    fs: pafs.FileSystem,
    settings: dict[str, Any],
    overwrite: bool,
    lineage: dict[str, Any] | None = None,
) -> set[str]:
    """Create or check the output folder; returns the names of fragments already committed. A resume must
    embed as the start did (`settings`); `lineage` is the start's record and is not compared."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise ValueError(f"output {root} is a file; give a folder")
    if info.type == pafs.FileType.Directory and overwrite:
        fs.delete_dir_contents(root)
    existing = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    manifest = f"{root}/{MANIFEST}"
    if any(i.path.endswith(MANIFEST) for i in existing):
        old = read_json(fs, manifest)["settings"]
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if set(diff) == {"snapshot"}:
            pinned, now = (str(v).split(":", 1)[-1] for v in diff["snapshot"])
            raise ValueError(
                f"output {root} was started on the input table's snapshot {pinned}; the table is at {now} now. "
                f"Resume it against that snapshot (snapshot={pinned}), or discard it and start again from the "
                "current one (overwrite=true)"
            )
        if diff:
            raise ValueError(
                f"output {root} was written with other settings {diff} (old, new); "
                "use a new output folder or overwrite=true"
            )
    elif existing:
        raise ValueError(
            f"output {root} holds files but no {MANIFEST}; use an empty folder or overwrite=true"
        )
    else:
        fs.create_dir(root, recursive=True)
        write_json(fs, manifest, {"settings": settings} | ({"lineage": lineage} if lineage else {}))
    return {posixpath.basename(i.path)[: -len(".json")] for i in list_dir(fs, f"{root}/{COMMITTED}")}


def committed_stats(root: str, fs: pafs.FileSystem) -> list[dict[str, Any]]:
    return [read_json(fs, i.path) for i in list_dir(fs, f"{root}/{COMMITTED}")]


def commit(
    fs: pafs.FileSystem, root: str, fragment: Fragment, staged: dict[str, str], stats: dict[str, Any]
) -> None:
    """Move staged files (temp path -> final relative path) into place, then write the marker."""
    for tmp, final in staged.items():
        dest = f"{root}/{final}"
        fs.create_dir(posixpath.dirname(dest), recursive=True)
        fs.move(tmp, dest)
    record = {"fragment": asdict(fragment), "files": sorted(staged.values()), **stats}
    write_json(fs, f"{root}/{COMMITTED}/{fragment.name}.json", record)


def staging_path(root: str, name: str) -> str:
    return f"{root}/{TMP}/{uuid.uuid4().hex}-{name}"


def list_dir(fs: pafs.FileSystem, path: str, suffix: str = ".json") -> list[pafs.FileInfo]:
    """Files directly in `path` ending in `suffix` (half-written `.tmp` files are not listed)."""
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [i for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)]


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    """Write via a temp name then move, so a reader never sees half a marker."""
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(obj, indent=1).encode())
    fs.move(tmp, path)
