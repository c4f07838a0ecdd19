"""Incremental re-embedding: output versions that together hold every current id exactly once.

Every output row carries `content_hash`, a hash of the text as it was embedded (title and text). A run
with `incremental_from: <previous output>` compares its input with the previous version's view (id ->
hash) range by range (embed/keys.py), embeds only rows whose id is new or whose hash changed, and
writes, besides its Parquet files, `_deleted.parquet`: the ids of the previous view that no input row has
any more, and `_keys/`: its own view's ids and hashes, for the next night.
The current view of a version is its own rows plus its base's current view minus the ids this version
re-embedded or deleted (`current`); its manifest names its base, so versions form a chain.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayembed.embed.manifest import MANIFEST, read_json

DELETED = "_deleted.parquet"


def content_hash(texts: list[str]) -> pa.Array:
    """16 hex digits of blake2b per text (what was embedded: title and text)."""
    return pa.array([hashlib.blake2b(t.encode(), digest_size=8).hexdigest() for t in texts], pa.string())


def _read(fs: pafs.FileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open_input_file(path) as f:
        return pq.read_table(f, columns=columns)


def own_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """This version's own output files (Parquet files outside the `_` folders), sorted."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.path.endswith(".parquet")
        and not any(p.startswith(("_", ".")) for p in posixpath.relpath(i.path, root).split("/"))
    )


def _rows(fs: pafs.FileSystem, root: str, columns: list[str] | None) -> pa.Table | None:
    """This version's own output rows."""
    tables = [_read(fs, f, columns) for f in own_files(fs, root)]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def base_of(
    fs: pafs.FileSystem, root: str, endpoint_url: str | None = None
) -> tuple[pafs.FileSystem, str] | None:
    """The (filesystem, root) of the version this one was built on, or None for a full run."""
    base = read_json(fs, f"{root}/{MANIFEST}")["settings"].get("base")
    if not base:
        return None
    from rayembed.io import filesystem, strip_scheme

    return filesystem(base, endpoint_url) or pafs.LocalFileSystem(), strip_scheme(base)


def chain(fs: pafs.FileSystem, root: str, endpoint_url: str | None) -> list[tuple[pafs.FileSystem, str]]:
    """The versions a view is made of, newest first: `root`, its base, the base's base, ..."""
    links, seen = [(fs, root)], {root}
    while (base := base_of(*links[-1], endpoint_url)) is not None:
        if base[1] in seen:
            raise ValueError(f"{root}: its chain of versions loops back to {base[1]}")
        seen.add(base[1])
        links.append(base)
    return links


LATEST = "latest"  # incremental_from: the newest finished version beside the output


def latest(fs: pafs.FileSystem, parent: str, other_than: str | None = None) -> str | None:
    """The newest finished version among the folders of `parent`, by name (night folders named by date
    sort in time; a compaction `<date>-full` after its night): a folder with a manifest and either the
    embed job's `_summary.json` (written at its end) or a compaction's record. None if there is none."""
    names = sorted(
        i.path
        for i in fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
        if i.type == pafs.FileType.Directory and i.path.rstrip("/") != (other_than or "").rstrip("/")
    )
    for path in reversed(names):
        if fs.get_file_info(f"{path}/{MANIFEST}").type != pafs.FileType.File:
            continue
        done = fs.get_file_info(f"{path}/_summary.json").type == pafs.FileType.File
        if done or "compacted_from" in read_json(fs, f"{path}/{MANIFEST}"):
            return path
    return None


def current(
    fs: pafs.FileSystem, root: str, columns: list[str] | None = None, endpoint_url: str | None = None
) -> pa.Table:
    """The current view of the output version at `root` (`columns` of it): every current id exactly once."""
    own = _rows(fs, root, columns)
    base = base_of(fs, root, endpoint_url)
    if base is None:
        return own if own is not None else pa.table({"id": pa.array([], pa.string())})
    older = current(*base, columns, endpoint_url)
    gone = [own.column("id").cast(pa.string())] if own is not None else []
    if fs.get_file_info(f"{root}/{DELETED}").type == pafs.FileType.File:
        gone.append(_read(fs, f"{root}/{DELETED}").column("id").cast(pa.string()))
    if gone:
        superseded = pa.chunked_array([c for g in gone for c in g.chunks], pa.string()).combine_chunks()
        older = older.filter(pc.invert(pc.is_in(older.column("id").cast(pa.string()), superseded)))
    parts = [t for t in (older, own) if t is not None and t.num_rows]
    return pa.concat_tables(parts, promote_options="default") if parts else older


def changes(fs: pafs.FileSystem, root: str) -> tuple[pa.Table, list[Any]]:
    """What the version at `root` changes in its base's view: its own rows, and the ids whose rows in the
    base view leave it (re-embedded here, or deleted), as values of the rows' id type."""
    own = _rows(fs, root, None)
    ids = [own.column("id")] if own is not None else []
    if fs.get_file_info(f"{root}/{DELETED}").type == pafs.FileType.File:
        gone = _read(fs, f"{root}/{DELETED}").column("id")
        ids.append(gone.cast(own.schema.field("id").type) if own is not None else gone)
    values = sorted({v for c in ids for v in c.to_pylist()})
    return (own if own is not None else pa.table({"id": pa.array([], pa.string())})), values


def settings_check(previous: dict[str, Any], settings: dict[str, Any]) -> None:
    """An incremental run must embed as its base did (model revision, dim, precision, text, prompt)."""
    keys = (
        "revision",
        "dim",
        "precision",
        "normalized",
        "max_length",
        "rope_scaling",
        "frame",
        "text",
        "prompt",
        "id_column",
        "chunking",
    )
    differ = {k: (previous.get(k), settings.get(k)) for k in keys if previous.get(k) != settings.get(k)}
    if differ:
        raise ValueError(f"incremental_from: the previous output was embedded with other settings {differ}")
