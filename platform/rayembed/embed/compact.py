"""Compaction: fold a chain of incremental versions into one full version that holds exactly its current
view (every current id once, deletions applied), so the next night's run starts from a version whose
chain is one link long. The output is plain Parquet (files outside the `_` folders) plus the manifest of
the newest version without its `base`: any engine reads the view from it, and `incremental_from` accepts it.

Memory for ids is bounded whatever their number: ids are split into hash buckets of at most `bucket_ids`;
for each bucket the versions' id columns are read newest first and a row is kept when no newer version
re-embedded or deleted its id (an exact string comparison). What is kept is one byte per row (1 GB at
1B rows), then the rows stream through once, file by file, into the output. Atomic: the manifest is
written last, so a killed compaction leaves a folder that is not a version (an incremental run refuses
it; rerun it).
"""

from __future__ import annotations

import math
import posixpath
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayembed.embed.keys import id_hash
from rayembed.embed.manifest import MANIFEST, read_json, write_json
from rayembed.embed.versions import DELETED, LATEST, chain, latest, own_files


def _bucket(ids: pa.Array, buckets: int) -> np.ndarray:
    return (id_hash(ids).to_numpy() % np.uint64(buckets)).astype(np.int64)


def _ids(fs: pafs.FileSystem, path: str) -> pa.Array:
    with fs.open_input_file(path) as f:
        return pq.read_table(f, columns=["id"]).column("id").cast(pa.string()).combine_chunks()


def _num_rows(fs: pafs.FileSystem, path: str) -> int:
    with fs.open_input_file(path) as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


def keep_masks(
    links: list[tuple[pafs.FileSystem, str]], files: list[list[str]], rows: int, bucket_ids: int
) -> tuple[list[list[np.ndarray]], int]:
    """Per version per file, which rows are in the current view; and how many buckets that took."""
    buckets = max(1, math.ceil(rows / bucket_ids))
    keep = [[np.zeros(0, bool) for _ in fs_files] for fs_files in files]
    for b in range(buckets):
        newer = pa.array([], pa.string())  # ids of this bucket that a newer version re-embedded or deleted
        for v, (fs, root) in enumerate(links):
            mine = []
            for i, path in enumerate(files[v]):
                ids = _ids(fs, path)
                if b == 0:
                    keep[v][i] = np.zeros(len(ids), bool)
                where = np.flatnonzero(_bucket(ids, buckets) == b)
                here = ids.take(pa.array(where))
                keep[v][i][where] = ~pc.is_in(here, value_set=newer).to_numpy(zero_copy_only=False)
                mine.append(here)
            if fs.get_file_info(f"{root}/{DELETED}").type == pafs.FileType.File:
                gone = _ids(fs, f"{root}/{DELETED}")
                mine.append(gone.filter(pa.array(_bucket(gone, buckets) == b)))
            newer = pa.concat_arrays([newer, *mine]) if mine else newer
    return keep, buckets


def compact(
    version: str,
    output: str,
    endpoint_url: str | None = None,
    overwrite: bool = False,
    bucket_ids: int = 20_000_000,
    rows_per_file: int = 1_000_000,
) -> dict[str, Any]:
    """Write the current view of the version at `version` to `output` as one full version. `version`
    may be `<folder>/latest` (its newest finished version); `{date}` in `output` becomes today's UTC date."""
    from rayembed.io import dated, filesystem, local_abspath, strip_scheme

    started = time.time()
    version, output = (
        local_abspath(version),
        local_abspath(dated(output)),
    )
    src_fs, src = filesystem(version, endpoint_url) or pafs.LocalFileSystem(), strip_scheme(version)
    if posixpath.basename(src) == LATEST:
        found = latest(src_fs, posixpath.dirname(src), other_than=strip_scheme(output))
        if found is None:
            raise FileNotFoundError(f"{version}: no finished version in {posixpath.dirname(version)}")
        src, version = found, version[: -len(LATEST)] + posixpath.basename(found)
    if src_fs.get_file_info(f"{src}/{MANIFEST}").type != pafs.FileType.File:
        raise FileNotFoundError(
            f"{version}: no {MANIFEST}, not an embed output (or a compaction that did not finish)"
        )
    out_fs, out = filesystem(output, endpoint_url) or pafs.LocalFileSystem(), strip_scheme(output)
    if out_fs.get_file_info(f"{out}/{MANIFEST}").type == pafs.FileType.File and not overwrite:
        raise FileExistsError(f"{output} is already a version; overwrite=true replaces it")
    links = chain(src_fs, src, endpoint_url)
    if any(strip_scheme(output).rstrip("/") == root.rstrip("/") for _, root in links):
        raise ValueError(f"{output} is a version of the chain being compacted; write to a new folder")
    files = [own_files(fs, root) for fs, root in links]
    rows = sum(_num_rows(fs, p) for (fs, _), paths in zip(links, files, strict=True) for p in paths)
    keep, buckets = keep_masks(links, files, rows, bucket_ids)
    out_fs.delete_dir_contents(out, missing_dir_ok=True)  # what a killed compaction left
    out_fs.create_dir(out, recursive=True)
    written = _write(links, files, keep, out_fs, out, rows_per_file)
    manifest = read_json(src_fs, f"{src}/{MANIFEST}")
    manifest["settings"].pop("base", None)
    manifest["compacted_from"] = [root for _, root in links]
    write_json(out_fs, f"{out}/{MANIFEST}", manifest)  # last: the folder is a version from here on
    return {"output": output, "versions": len(links), "rows_read": rows, "rows": written["rows"],
            "files": written["files"], "buckets": buckets, "seconds": round(time.time() - started, 1)}  # fmt: skip


def _write(
    links: list[tuple[pafs.FileSystem, str]],
    files: list[list[str]],
    keep: list[list[np.ndarray]],
    out_fs: pafs.FileSystem,
    out: str,
    rows_per_file: int,
) -> dict[str, int]:
    """Stream the kept rows, oldest version first, into part-NNNNN.parquet files of `rows_per_file` rows."""
    sink, writer, schema = None, None, None
    n_files, in_file, total = 0, 0, 0
    try:
        for (fs, _), paths, masks in reversed(list(zip(links, files, keep, strict=True))):
            for path, mask in zip(paths, masks, strict=True):
                with fs.open_input_file(path) as f:
                    table = pq.read_table(f).filter(pa.array(mask))
                schema = schema or table.schema
                table = table if table.schema.equals(schema) else table.cast(schema)
                start = 0
                while start < table.num_rows:
                    if writer is None or in_file == rows_per_file:
                        _close(writer, sink)
                        sink = out_fs.open_output_stream(f"{out}/part-{n_files:05d}.parquet")
                        writer, in_file, n_files = pq.ParquetWriter(sink, schema), 0, n_files + 1
                    take = min(rows_per_file - in_file, table.num_rows - start)
                    writer.write_table(table.slice(start, take))
                    in_file, start, total = in_file + take, start + take, total + take
    finally:
        _close(writer, sink)
    return {"rows": total, "files": n_files}


def _close(writer: pq.ParquetWriter | None, sink: Any) -> None:
    if writer is not None:
        writer.close()
    if sink is not None:
        sink.close()  # the stream is ours: on S3 this completes the upload
