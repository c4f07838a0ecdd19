"""What an embed run reads: the input's fragments (files, or a table's data files), checked before any
work, and how an incremental run finds what changed (a table's snapshot diff or change data feed)."""

from __future__ import annotations

from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayembed.embed.actor import peek_columns
from rayembed.embed.config import EmbedConfig
from rayembed.embed.feed import PATH as FEED_PATH
from rayembed.embed.feed import feed_enabled
from rayembed.embed.keys import FEED
from rayembed.embed.manifest import MANIFEST, Fragment, fragments_of, list_fragments, read_json
from rayembed.embed.rows import check_columns, fs_for, needed_columns
from rayembed.embed.tables import (
    check_text_type,
    delta_has_version,
    delta_storage,
    file_infos,
    table_diff,
    table_files,
)
from rayembed.io import strip_scheme


def input_fragments(cfg: EmbedConfig, settings: dict[str, Any]) -> tuple[list[Fragment], str, dict[str, Any]]:
    """(the input's fragments, the URI whose filesystem reads them, how changes are found), after checking
    the first one's columns and, where the input has a schema, that the text column holds strings. A
    table's snapshot (Iceberg) or version (Delta) joins the output's settings."""
    if cfg.input_format != "files":
        return table_fragments(cfg, settings)
    fs = fs_for(cfg.input, cfg.s3_endpoint_url)
    fragments = list_fragments(strip_scheme(cfg.input), fs, cfg.fragment_rows, cfg.fragment_bytes)
    check_first(cfg, fragments[0], fs)
    return fragments, cfg.input, {"path": "content hash"} if cfg.incremental_from else {}


def table_fragments(cfg: EmbedConfig, settings: dict[str, Any]) -> tuple[list[Fragment], str, dict[str, Any]]:
    """input_fragments of an Iceberg or Delta table. An incremental run whose base snapshot (version) is
    still in the table's history reads only the data files added since; over a Delta table with a change
    data feed, only the rows it lists (their fragments are made in the output once it is opened: feed.py)."""
    found = table_files(cfg.input_format, cfg.input, cfg.iceberg_catalog, cfg.s3_endpoint_url, cfg.snapshot)
    if not found.files:
        raise FileNotFoundError(f"{cfg.input_format} table {cfg.input} has no data files")
    settings["snapshot"] = f"{cfg.input_format}:{found.version}"
    source = found.location.removeprefix("file://")
    fs = fs_for(source, cfg.s3_endpoint_url)
    detection: dict[str, Any] = {"path": "content hash"} if cfg.incremental_from else {}
    files, since = found.files, base_snapshot(cfg)
    feed = cfg.input_format == "delta" and cfg.change_feed and feed_enabled(found.properties)
    if (
        since is not None
        and feed
        and delta_has_version(cfg.input, delta_storage(cfg.input, cfg.s3_endpoint_url), since)
    ):
        check_columns(found.schema.names, needed_columns(cfg), cfg.input)
        for column in (cfg.text_column, cfg.title_column):
            if column:
                check_text_type(found.schema, column, cfg.input)
        source = f"{cfg.output.rstrip('/')}/{FEED}"  # the feed's rows are read from the output's filesystem
        return [], source, {"path": FEED_PATH, "since": since, "version": int(found.version)}
    diff = None
    if since is not None:
        diff = table_diff(cfg.input_format, cfg.input, cfg.iceberg_catalog, cfg.s3_endpoint_url, since,
                          int(found.version))  # fmt: skip
    if diff is not None:
        files = diff[0]
        path = "iceberg snapshot diff" if cfg.input_format == "iceberg" else "delta log diff"
        detection = {"path": path, "since": since, "files_added": len(diff[0]),
                     "files_removed": len(diff[1]), "files_skipped": len(found.files) - len(diff[0]),
                     "removed": [strip_scheme(f.removeprefix("file://")) for f in diff[1]]}  # fmt: skip
    fragments = fragments_of(file_infos(files, fs), strip_scheme(source), fs, cfg.fragment_rows)
    if fragments:  # a diff may add no file at all
        check_first(cfg, fragments[0], fs)
    return fragments, source, detection


def check_first(cfg: EmbedConfig, first: Fragment, fs: pafs.FileSystem) -> None:
    """The first fragment has the job's columns, and (Parquet) strings in its text columns."""
    check_columns(peek_columns(first, fs), needed_columns(cfg), first.path)
    if first.fmt == "parquet":
        schema = pq.read_schema(fs.open_input_file(first.path))
        for column in (cfg.text_column, cfg.title_column):
            if column:
                check_text_type(schema, column, first.path)


def base_snapshot(cfg: EmbedConfig) -> int | None:
    """The Iceberg snapshot or Delta version the incremental run's base read, when diffs of the table's
    data files may find the changes."""
    if not (cfg.incremental_from and cfg.snapshot_diff and cfg.input_format in ("iceberg", "delta")):
        return None
    fs, root = fs_for(cfg.incremental_from, cfg.s3_endpoint_url), strip_scheme(cfg.incremental_from)
    if fs.get_file_info(f"{root}/{MANIFEST}").type != pafs.FileType.File:
        return None  # previous_view says why
    snapshot = str(read_json(fs, f"{root}/{MANIFEST}")["settings"].get("snapshot", ""))
    return int(snapshot.split(":", 1)[1]) if snapshot.startswith(f"{cfg.input_format}:") else None
