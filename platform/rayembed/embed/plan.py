"""An incremental run's plan (keys.py): scan the input's keys, get the base's, compare them range by range.

Every step is a set of Ray tasks (at most `window` in flight, each holding one fragment, one file or one
range of ids), so neither the driver nor any worker holds the lake's ids; the driver keeps counts.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayembed.embed.config import EmbedConfig
from rayembed.embed.keys import (
    INDEX,
    KEY_SCHEMA,
    KEYS,
    PLAN,
    PLANNED,
    base_files,
    bits_for,
    compare,
    finish_plan,
    gather_deleted,
    keys_of,
    read_range,
    run_bounded,
    span,
    write,
)
from rayembed.embed.manifest import (
    REJECTS,
    TMP,
    Fragment,
    commit,
    list_dir,
    read_json,
    staging_path,
    write_json,
)
from rayembed.embed.rows import fs_for, read_fragment, screen
from rayembed.embed.versions import DELETED, base_of, content_hash, current, own_files
from rayembed.io import ensure_ray, strip_scheme


def scan_fragment(cfg: dict[str, Any], fragment: str) -> int:
    """Task: one input fragment's keys -> `_plan/scan/` (its rows with a text; rejected rows leave the view),
    its counts -> `_plan/stats/` and its rejected rows -> `_plan/rejects/`: a fragment with nothing to
    embed is then committed from these, its input not read again."""
    c, frag = EmbedConfig(**cfg), Fragment(**json.loads(fragment))
    fs, root = fs_for(c.output, c.s3_endpoint_url), f"{strip_scheme(c.output)}/{PLAN}"
    parts, bad, stats = [], [], Counter[str]()
    for table in read_fragment(c, fs_for(c.input, c.s3_endpoint_url), frag):
        texts, good, rejects = screen(c, table)
        ids = table.column(c.id_column).take(pa.array(good, pa.int64()))
        parts.append(keys_of(ids, content_hash([texts[i] for i in good]), frag.name))
        bad.append(rejects)
        stats.update(f"rejected:{r}" for r in rejects.column("reason").to_pylist())
        stats["rows_in"] += table.num_rows
    empty = keys_of(pa.array([], pa.string()), pa.array([], pa.string()), "")
    keys = pa.concat_tables(parts).sort_by("h") if parts else empty
    write(fs, f"{root}/scan/{frag.name}", keys)
    rejected = pa.concat_tables(bad) if bad else None
    if rejected is not None and rejected.num_rows:  # as the actor writes them: with the fragment's key
        write(
            fs,
            f"{root}/rejects/{frag.name}",
            rejected.append_column("fragment", pa.array([frag.key] * rejected.num_rows)),
        )
    write_json(fs, f"{root}/stats/{frag.name}.json", dict(stats) | {"unchanged": keys.num_rows})
    return keys.num_rows


def scan_file(
    uri: str, endpoint: str | None, path: str, column: str, hashed: bool, out_uri: str, out: str
) -> int:
    """Task: one file's keys -> `out`: a base's output file (id, content_hash), or, `hashed` false, a table's
    removed data file (its id `column` only)."""
    fs = fs_for(uri, endpoint)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f, columns=[column, "content_hash"] if hashed else [column])
    hashes = table.column("content_hash") if hashed else pa.nulls(table.num_rows, pa.string())
    keys = keys_of(table.column(column), hashes)
    write(fs_for(out_uri, endpoint), out, keys)
    return keys.num_rows


def compare_range(cfg: dict[str, Any], k: int, bits: int, diff: bool, base: str | None) -> dict[str, Any]:
    """Task: range k compared (keys.compare); the base's keys from its `_keys`, else from this plan's scan
    of it (`base` None)."""
    c = EmbedConfig(**cfg)
    fs, root = fs_for(c.output, c.s3_endpoint_url), strip_scheme(c.output)
    lo, hi = span(k, bits)
    cols = KEY_SCHEMA.names
    if base is not None:
        base_fs = fs_for(base, c.s3_endpoint_url)
        old = read_range(base_fs, base_files(base_fs, strip_scheme(base), lo, hi), lo, hi, cols)
    else:
        old = read_range(fs, [i.path for i in list_dir(fs, f"{root}/{PLAN}/base", ".parquet")], lo, hi, cols)
    return compare(fs, root, old, k, bits, diff)


def make_plan(
    cfg: EmbedConfig, fragments: list[Fragment], source: str, removed: list[str] | None
) -> dict[str, Any]:
    """The plan of an incremental run into `cfg.output` (done once: a resumed run reads its marker). `removed`:
    a snapshot diff's removed data files (only their ids may leave the view), or None (a full scan)."""
    import ray

    fs, root = fs_for(cfg.output, cfg.s3_endpoint_url), strip_scheme(cfg.output)
    if fs.get_file_info(f"{root}/{PLANNED}").type == pafs.FileType.File:
        return dict(read_json(fs, f"{root}/{PLANNED}"))
    ensure_ray()
    window = max(1, int(ray.cluster_resources().get("CPU", 0)))  # each task holds a fragment, file or range
    for folder in (PLAN, KEYS):  # an unfinished plan is made again
        if fs.get_file_info(f"{root}/{folder}").type == pafs.FileType.Directory:
            fs.delete_dir(f"{root}/{folder}")
    for folder in ("scan", "stats", "rejects", "removed", "base", "todo", "deleted"):
        fs.create_dir(f"{root}/{PLAN}/{folder}", recursive=True)
    fs.create_dir(f"{root}/{KEYS}", recursive=True)
    opts = {"num_cpus": 1, "runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "2"}}}
    cfg_dict = dataclasses.asdict(cfg) | {"input": source}
    scan = ray.remote(scan_fragment).options(**opts)
    new = sum(run_bounded(scan, [(cfg_dict, json.dumps(dataclasses.asdict(f))) for f in fragments], window))
    file_task = ray.remote(scan_file).options(**opts)
    if removed:
        calls = [(source, cfg.s3_endpoint_url, p, cfg.id_column, False, cfg.output, f"{root}/{PLAN}/removed/{i:06d}.parquet")
                 for i, p in enumerate(removed)]  # fmt: skip
        run_bounded(file_task, calls, window)
    base, old = base_keys(cfg, fs, root, file_task, window)
    bits = bits_for(max(new, old), cfg.bucket_ids)
    task = ray.remote(compare_range).options(**opts)
    counts = run_bounded(
        task, [(cfg_dict, k, bits, removed is not None, base) for k in range(1 << bits)], window
    )
    gather_deleted(fs, root, f"{root}/{DELETED}")
    return finish_plan(fs, root, bits, counts, {"scanned": new, "base_ids": old})


def base_keys(
    cfg: EmbedConfig, fs: pafs.FileSystem, root: str, file_task: Any, window: int
) -> tuple[str | None, int]:
    """(the base's URI when its `_keys` serve, else None after scanning it into `_plan/base/`; its ids)."""
    assert cfg.incremental_from is not None
    base_fs, base_root = fs_for(cfg.incremental_from, cfg.s3_endpoint_url), strip_scheme(cfg.incremental_from)
    if base_fs.get_file_info(f"{base_root}/{INDEX}").type == pafs.FileType.File:
        return cfg.incremental_from, int(read_json(base_fs, f"{base_root}/{INDEX}")["rows"])
    out = f"{root}/{PLAN}/base"
    if base_of(base_fs, base_root, cfg.s3_endpoint_url) is None:  # a full run or a compaction: its own rows
        files = own_files(base_fs, base_root)
        calls = [(cfg.incremental_from, cfg.s3_endpoint_url, p, "id", True, cfg.output, f"{out}/{i:06d}.parquet")
                 for i, p in enumerate(files)]  # fmt: skip
        return None, sum(run_bounded(file_task, calls, window))
    # an incremental version from before the key index: its chain walked once, in memory
    view = current(base_fs, base_root, ["id", "content_hash"], cfg.s3_endpoint_url)
    write(fs, f"{out}/000000.parquet", keys_of(view.column("id"), view.column("content_hash")))
    return None, view.num_rows


def commit_unchanged(fs: pafs.FileSystem, root: str, frag: Fragment) -> dict[str, Any]:
    """A fragment the plan lists nothing to embed for: committed with its scan's counts and rejected rows,
    its input not read again (by the driver, without an actor, or by an actor of an older plan)."""
    plan = f"{root}/{PLAN}"
    stats = read_json(fs, f"{plan}/stats/{frag.name}.json")
    staged = {}
    if fs.get_file_info(f"{plan}/rejects/{frag.name}").type == pafs.FileType.File:
        tmp = staging_path(root, frag.name)
        fs.copy_file(f"{plan}/rejects/{frag.name}", tmp)
        staged[tmp] = f"{REJECTS}/{frag.name}"
    commit(fs, root, frag, staged, stats)
    return dict(stats)


def commit_quiet(fs: pafs.FileSystem, root: str, fragments: list[Fragment]) -> None:
    """commit_unchanged for each of `fragments`, 16 at a time (an object store's requests wait, not work)."""
    from concurrent.futures import ThreadPoolExecutor

    if fragments:
        fs.create_dir(f"{root}/{TMP}", recursive=True)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda f: commit_unchanged(fs, root, f), fragments))
