"""Delta's change data feed as an incremental run's input: only the rows that changed since the base's version.

A Delta table with `delta.enableChangeDataFeed` keeps, for every commit, the rows it inserted, deleted and
updated (pre- and post-image), so a night need not read whole data files that a one-row update rewrote
(the log diff's granularity). The feed from the base's version (exclusive) to the pinned one goes, in
three steps, into the output's `_feed/` folder:

1. a Ray task streams the feed (the job's columns, `_change_type`, `_commit_version`) into
   `_feed/raw/` files of `fragment_rows` rows, each sorted by the id's 64-bit hash `h` (keys.py);
2. a Ray task per range of `h` (at most `bucket_ids` feed rows a range) nets each id's events: its last
   commit decides, and within a commit an insert or post-image beats a delete or pre-image (an overwrite
   deletes and re-inserts a row in one commit). Ids present at the end -> `_feed/rows/` (their last row),
   ids deleted at the end -> `_feed/gone/`;
3. `_feed/_done.json` lists the rows' fragments and the counts.

The incremental plan (plan.py) then treats `_feed/rows/` as the input's added rows and `_feed/gone/` as the
ids that may have left the view, as it treats a snapshot diff's added and removed files: an id the base
had with the same text is not embedded again. The folders are dropped when the run ends; the marker stays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayembed.embed.config import EmbedConfig
from rayembed.embed.keys import FEED, PLANNED, bits_for, id_hash, read_range, run_bounded, span, write
from rayembed.embed.manifest import Fragment, fragments_of, list_dir, read_json, write_json
from rayembed.embed.rows import fs_for, needed_columns, plain_strings
from rayembed.io import ensure_ray, strip_scheme

FEED_DONE = f"{FEED}/_done.json"
PATH = "delta change data feed"
ENABLED = "delta.enableChangeDataFeed"
EVENTS = ["_change_type", "_commit_version"]
PRESENT = ("insert", "update_postimage")  # the row exists after its commit; delete / update_preimage: not


def feed_enabled(properties: dict[str, str]) -> bool:
    """Whether a Delta table with this configuration writes a change data feed."""
    return properties.get(ENABLED, "").lower() == "true"


def feed_input(
    cfg: EmbedConfig, storage: dict[str, str], since: int, now: int
) -> tuple[list[Fragment], dict[str, Any]]:
    """(the fragments of the rows the feed left present, how they were found: counts and the `gone` files
    as `removed`), from `_feed/` once made; a resumed run whose plan is done reads its marker."""
    fs, root = fs_for(cfg.output, cfg.s3_endpoint_url), strip_scheme(cfg.output)
    if fs.get_file_info(f"{root}/{PLANNED}").type != pafs.FileType.File:  # an unfinished feed is made again
        if fs.get_file_info(f"{root}/{FEED}").type == pafs.FileType.Directory:
            fs.delete_dir(f"{root}/{FEED}")
        make_feed(cfg, storage, since, now, fs, root)
    done = read_json(fs, f"{root}/{FEED_DONE}")
    fragments = [Fragment(**f | {"row_groups": tuple(f["row_groups"])}) for f in done.pop("fragments")]
    return fragments, {"path": PATH, "since": since, **done}


def make_feed(
    cfg: EmbedConfig, storage: dict[str, str], since: int, now: int, fs: pafs.FileSystem, root: str
) -> None:
    import ray

    for folder in ("raw", "rows", "gone"):
        fs.create_dir(f"{root}/{FEED}/{folder}", recursive=True)
    ensure_ray()  # the feed is read by a task: the driver holds none of it (nor waits in delta-rs)
    cfg_dict = dataclasses.asdict(cfg)
    reader = ray.remote(stream_feed).options(num_cpus=1)
    rows = ray.get(reader.remote(cfg_dict, storage, since, now, f"{root}/{FEED}/raw"))
    window = max(1, int(ray.cluster_resources().get("CPU", 0)))
    bits = bits_for(rows, cfg.bucket_ids)
    task = ray.remote(net_range).options(num_cpus=1)
    counts = run_bounded(task, [(cfg_dict, k, bits) for k in range(1 << bits)], window)
    fs.delete_dir(f"{root}/{FEED}/raw")
    fragments = fragments_of(list_dir(fs, f"{root}/{FEED}/rows", ".parquet"), root, fs, cfg.fragment_rows)
    write_json(fs, f"{root}/{FEED_DONE}", {
        "feed_rows": rows,
        "changed_rows": sum(c["present"] for c in counts),
        "gone_rows": sum(c["gone"] for c in counts),
        "removed": [i.path for i in list_dir(fs, f"{root}/{FEED}/gone", ".parquet")],
        "fragments": [dataclasses.asdict(f) for f in fragments],
    })  # fmt: skip


def stream_feed(cfg_dict: dict[str, Any], storage: dict[str, str], since: int, now: int, out: str) -> int:
    """Task: the feed of versions (since, now] -> `out` (in the output's filesystem), in h-sorted files of
    `fragment_rows` rows (one such buffer in memory); returns the rows written."""
    from deltalake import DeltaTable

    if now <= since:  # nothing committed since the base (load_cdf refuses a start past the end)
        return 0
    cfg = EmbedConfig(**cfg_dict)
    fs = fs_for(cfg.output, cfg.s3_endpoint_url)
    table = DeltaTable(cfg.input, version=now, storage_options=storage or None)
    columns = needed_columns(cfg) + EVENTS
    reader = pa.RecordBatchReader.from_stream(table.load_cdf(starting_version=since + 1, ending_version=now,
                                                             columns=columns))  # fmt: skip
    buffer: list[pa.RecordBatch] = []
    held = written = files = 0

    def flush() -> None:
        nonlocal buffer, held, written, files
        part = plain_strings(pa.Table.from_batches(buffer)).select(columns)
        ids = part.column(cfg.id_column)
        part = part.append_column("h", id_hash(ids)).sort_by("h")
        write(fs, f"{out}/{files:06d}.parquet", part)
        buffer, held, written, files = [], 0, written + part.num_rows, files + 1

    try:
        for batch in reader:
            buffer.append(batch)
            held += batch.num_rows
            if held >= cfg.fragment_rows:
                flush()
    except Exception as e:  # noqa: BLE001 - delta-rs's errors arrive as Arrow stream errors
        raise RuntimeError(
            f"delta table {cfg.input}: its change data feed of versions {since + 1}..{now} cannot be read "
            f"({str(e)[:300]}); a VACUUM may have removed its files: rerun with change_feed=false"
        ) from e
    if held:
        flush()
    return written


def net_range(cfg_dict: dict[str, Any], k: int, bits: int) -> dict[str, int]:
    """Task: the feed's events of range k netted to each id's state at the pinned version."""
    c = EmbedConfig(**cfg_dict)
    fs, root = fs_for(c.output, c.s3_endpoint_url), f"{strip_scheme(c.output)}/{FEED}"
    lo, hi = span(k, bits)
    raw = [i.path for i in list_dir(fs, f"{root}/raw", ".parquet")]
    events = read_range(fs, raw, lo, hi, needed_columns(c) + EVENTS)
    if not events.num_rows:
        return {"present": 0, "gone": 0}
    rank = pc.is_in(events.column("_change_type"), pa.array(PRESENT)).cast(pa.int8())
    events = events.append_column("_present", rank).sort_by(
        [(c.id_column, "ascending"), ("_commit_version", "ascending"), ("_present", "ascending")]
    )
    ids = events.column(c.id_column).combine_chunks()
    # an id's last event: the next row has another id (or there is none)
    following = pc.fill_null(pc.not_equal(ids.slice(0, len(ids) - 1), ids.slice(1)), True)
    last = pa.concat_arrays([following, pa.array([True])])
    present = pc.and_(last, pc.equal(events.column("_present"), 1))
    gone = pc.and_(pc.and_(last, pc.equal(events.column("_present"), 0)), pc.is_valid(ids))
    kept = events.filter(present).select(needed_columns(c))
    name = f"{bits:02d}-{k:06d}.parquet"
    if kept.num_rows:  # rows files are the run's fragments: a row group per `fragment_rows`
        with fs.open_output_stream(f"{root}/rows/feed-{name}") as f:
            pq.write_table(kept, f, row_group_size=c.fragment_rows)
    dropped = events.filter(gone).select([c.id_column])
    if dropped.num_rows:
        write(fs, f"{root}/gone/{name}", dropped)
    return {"present": kept.num_rows, "gone": dropped.num_rows}
