"""The key index: how an incremental run compares its input with the previous view in bounded memory.

An incremental version keeps `_keys/`: the (id, content hash) of its whole current view, split by a
64-bit hash of the id (`h`) into 2**bits contiguous ranges, one Parquet file per range, sorted by `h`,
and `_keys/_index.json` ({bits, rows}). A night runs in three steps, each a set of Ray tasks whose memory
is one fragment or one range, never the lake (the driver holds counts only):

1. scan: each input fragment's ids and content hashes -> `_plan/scan/<fragment>.parquet` (sorted by `h`;
   with a snapshot diff, the ids of the table's removed files -> `_plan/removed/`);
2. compare, per range of `h` (at most `bucket_ids` ids a side): the scanned keys against the base's keys of
   that range -> the new `_keys/<range>.parquet`, the ids to embed with their fragment
   (`_plan/todo/<range>.parquet`, sorted by fragment) and the ids gone (`_plan/deleted/<range>.parquet`);
   `_plan/_done.json` marks the plan complete, so a resumed run does not plan again;
3. embed: an actor embeds, of its fragment, the ids the plan lists for it (read with a filter on the
   fragment: row-group statistics skip the rest).

A base without `_keys` (a full run, a compaction) gives its keys by a scan of its own files' id and
content_hash columns; an incremental version written before `_keys` existed, by walking its chain once in
memory (`versions.current`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayembed.embed.manifest import list_dir, read_json, write_json

KEYS = "_keys"
PLAN = "_plan"
FEED = "_feed"  # a Delta change feed's rows, netted (feed.py): dropped with the plan's files
PLANNED = f"{PLAN}/_done.json"
INDEX = f"{KEYS}/_index.json"
GROUP_ROWS = 1024  # rows per Parquet row group: a range read skips the groups outside it
KEY_SCHEMA = pa.schema([("h", pa.uint64()), ("id", pa.string()), ("content_hash", pa.string())])


def id_hash(ids: pa.Array) -> pa.Array:
    """A 64-bit hash of each id (as a string): what the key index is split and sorted by."""
    import pandas as pd

    values = np.asarray(ids.cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object)
    return pa.array(pd.util.hash_array(values, categorize=False), pa.uint64())


def keys_of(ids: pa.Array, hashes: pa.Array, fragment: str | None = None) -> pa.Table:
    """(h, id, content_hash[, fragment]) sorted by h: one fragment's or file's keys."""
    ids = ids.cast(pa.string())
    cols: dict[str, Any] = {"h": id_hash(ids), "id": ids, "content_hash": hashes.cast(pa.string())}
    if fragment is not None:
        cols["fragment"] = pa.array([fragment] * len(ids), pa.string())
    return pa.table(cols).sort_by("h")


def write(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f, row_group_size=GROUP_ROWS)


def bits_for(rows: int, bucket_ids: int) -> int:
    """log2 of the number of ranges that keeps each at most `bucket_ids` ids (on average)."""
    return max(0, math.ceil(math.log2(max(1, math.ceil(rows / bucket_ids)))))


def span(k: int, bits: int) -> tuple[int, int]:
    """The range k of 2**bits: [lo, hi] of h, both inclusive."""
    width = 1 << (64 - bits)
    return k * width, (k + 1) * width - 1


def read_range(fs: pafs.FileSystem, paths: Iterable[str], lo: int, hi: int, columns: list[str]) -> pa.Table:
    """The rows of these h-sorted files whose h is in [lo, hi] (row groups outside are skipped)."""
    h = pc.field("h")
    where = (h >= pa.scalar(lo, pa.uint64())) & (h <= pa.scalar(hi, pa.uint64()))
    parts = []
    for p in paths:
        with fs.open_input_file(p) as f:
            parts.append(pq.read_table(f, columns=columns, filters=where))
    if not parts:
        return pa.table({c: pa.array([], KEY_SCHEMA.field(c).type if c in KEY_SCHEMA.names else pa.string())
                         for c in columns})  # fmt: skip
    return pa.concat_tables(parts).combine_chunks()


def base_files(fs: pafs.FileSystem, root: str, lo: int, hi: int) -> list[str]:
    """The base's `_keys` files that hold h in [lo, hi] (named by their range, at the base's bits)."""
    bits = int(read_json(fs, f"{root}/{INDEX}")["bits"])
    first, last = lo >> (64 - bits) if bits else 0, hi >> (64 - bits) if bits else 0
    return [f"{root}/{KEYS}/{name(k, bits)}" for k in range(first, last + 1)]


def name(k: int, bits: int) -> str:
    return f"{bits:02d}-{k:06d}.parquet"


def unique_ids(table: pa.Table) -> pa.Table:
    """One row per id (a chunked output has a row per chunk, each with its document's hash)."""
    if table.num_rows == len(pc.unique(table.column("id"))):
        return table
    return (
        table.group_by("id", use_threads=False)
        .aggregate([("h", "first"), ("content_hash", "first")])
        .rename_columns(["id", "h", "content_hash"])
        .select(["h", "id", "content_hash"])
    )


def compare(fs: pafs.FileSystem, root: str, old: pa.Table, k: int, bits: int, diff: bool) -> dict[str, int]:
    """Range k: the scanned keys against the base's (`old`); writes the version's keys, the ids to embed
    by fragment, and the ids gone. With a snapshot `diff` the scan holds only the added files: an old id
    leaves the view only if a removed file held it and no added file does; else (a full scan) if the
    scan lacks it."""
    lo, hi = span(k, bits)
    scans = [i.path for i in list_dir(fs, f"{root}/{PLAN}/scan", ".parquet")]
    new = read_range(fs, scans, lo, hi, ["h", "id", "content_hash", "fragment"])
    old = unique_ids(old)
    seen = pc.is_in(old.column("id"), new.column("id"))
    if diff:
        removed = [i.path for i in list_dir(fs, f"{root}/{PLAN}/removed", ".parquet")]
        maybe = pc.is_in(old.column("id"), read_range(fs, removed, lo, hi, ["id"]).column("id"))
        gone = pc.and_(maybe, pc.invert(seen))
        kept = old.filter(pc.invert(pc.or_(seen, maybe)))
    else:
        gone, kept = pc.invert(seen), old.slice(0, 0)
    before = new.join(old.select(["id", "content_hash"]), "id", join_type="left outer", right_suffix="_old",
                      use_threads=False)  # fmt: skip
    fresh = pc.fill_null(pc.not_equal(before.column("content_hash"), before.column("content_hash_old")), True)
    todo = (
        before.filter(fresh)
        .select(["fragment", "id"])
        .sort_by([("fragment", "ascending"), ("id", "ascending")])
    )
    view = pa.concat_tables([unique_ids(new.select(KEY_SCHEMA.names)), kept.select(KEY_SCHEMA.names)])
    write(fs, f"{root}/{KEYS}/{name(k, bits)}", view.sort_by("h"))
    write(fs, f"{root}/{PLAN}/todo/{name(k, bits)}", todo)
    deleted = old.filter(gone).select(["id"])
    write(fs, f"{root}/{PLAN}/deleted/{name(k, bits)}", deleted)
    busy = pc.unique(todo.column("fragment")).to_pylist()  # the fragments with something to embed
    return {"view": view.num_rows, "todo": todo.num_rows, "deleted": deleted.num_rows, "busy": busy}


def todo_of(fs: pafs.FileSystem, root: str, fragment: str) -> set[str]:
    """The ids the plan has this fragment embed."""
    ids: set[str] = set()
    for info in list_dir(fs, f"{root}/{PLAN}/todo", ".parquet"):
        with fs.open_input_file(info.path) as f:
            part = pq.read_table(f, columns=["id"], filters=[("fragment", "=", fragment)])
        ids.update(part.column("id").to_pylist())
    return ids


def gather_deleted(fs: pafs.FileSystem, root: str, path: str) -> None:
    """The plan's deleted ids, range by range, into one file (`_deleted.parquet`)."""
    with fs.open_output_stream(path) as out, pq.ParquetWriter(out, pa.schema([("id", pa.string())])) as w:
        for info in list_dir(fs, f"{root}/{PLAN}/deleted", ".parquet"):
            with fs.open_input_file(info.path) as f:
                part = pq.read_table(f)
            w.write_table(part)


def run_bounded(fn: Any, calls: list[tuple[Any, ...]], window: int) -> list[Any]:
    """`fn` (a Ray remote function) over `calls`, at most `window` in flight; results in order."""
    import ray

    results: dict[Any, int] = {}
    out: list[Any] = [None] * len(calls)
    pending = iter(enumerate(calls))
    for i, args in pending:
        results[fn.remote(*args)] = i
        if len(results) >= window:
            break
    while results:
        done, _ = ray.wait(list(results), num_returns=1)
        out[results.pop(done[0])] = ray.get(done[0])
        nxt = next(pending, None)
        if nxt is not None:
            results[fn.remote(*nxt[1])] = nxt[0]
    return out


def finish_plan(
    fs: pafs.FileSystem, root: str, bits: int, counts: list[dict[str, Any]], extra: dict[str, Any]
) -> dict[str, Any]:
    """`_keys/_index.json` and the plan's marker (written last: the plan is whole), which lists the
    fragments with something to embed (`busy`): the others are committed without an actor."""
    total = {k: sum(c[k] for c in counts) for k in ("view", "todo", "deleted")}
    write_json(fs, f"{root}/{INDEX}", {"bits": bits, "rows": total["view"]})
    busy = sorted({f for c in counts for f in c["busy"]})
    plan = {"bits": bits, **total, **extra, "busy": busy}
    write_json(fs, f"{root}/{PLANNED}", plan)
    return plan


def drop_plan_files(fs: pafs.FileSystem, root: str) -> None:
    """The plan's files once the run is done (a lake's worth of scanned keys; a change feed's rows); the
    markers stay, so a rerun of the finished run does not plan again."""
    for folder in (PLAN, FEED):
        for info in fs.get_file_info(pafs.FileSelector(f"{root}/{folder}", allow_not_found=True)):
            if info.type == pafs.FileType.Directory:
                fs.delete_dir(info.path)
