"""Lake tables in and out: Apache Iceberg and Delta Lake.

Input: the data files of the table's current snapshot (Iceberg, through its catalog) or version (Delta)
are Parquet files, immutable once written, so they become Parquet fragments like any other and the
exactly-once bookkeeping holds; the snapshot/version goes into the output's settings, so resuming into
the same output after the table moved on is refused (run an incremental version instead). Tables whose
snapshot needs delete files (Iceberg merge-on-read) or deletion vectors (Delta) are refused: their data
files hold rows that are no longer in the table.

Output: besides the Parquet folder, `iceberg_append` keeps an Iceberg table of the same catalog at the
output's current view, in one commit per run recorded with the output's location (`write_iceberg`), so a
rerun never applies twice: a full run appends its rows, an incremental one replaces the rows it re-embedded
and deletes the ids that are gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from rayembed.io import is_s3, strip_scheme


@dataclass(frozen=True)
class TableFiles:
    files: list[str]
    """Data file URIs (file:// or s3://) of the current snapshot."""
    location: str
    """The table's root URI (its scheme picks the filesystem the actors read with)."""
    version: str
    """Snapshot id (Iceberg) or version (Delta)."""
    schema: pa.Schema
    properties: dict[str, str] = field(default_factory=dict)
    """The table's configuration at that version (Delta; e.g. whether it writes a change data feed)."""


def catalog(props: dict[str, Any]) -> Any:
    """An Iceberg catalog from properties (pyiceberg's: type, uri, warehouse, s3.endpoint, ...)."""
    from pyiceberg.catalog import load_catalog

    props = dict(props)
    return load_catalog(props.pop("name", "rayembed"), **props)


def iceberg_files(identifier: str, props: dict[str, Any], pinned: int | None = None) -> TableFiles:
    """The data files of the current snapshot, or of snapshot `pinned`."""
    table = catalog(props).load_table(identifier)
    snapshot = table.current_snapshot() if pinned is None else table.snapshot_by_id(pinned)
    if pinned is not None and snapshot is None:
        known = [s.snapshot_id for s in table.snapshots()][-5:]
        raise ValueError(f"iceberg table {identifier} has no snapshot {pinned} (its last ones: {known})")
    tasks = list(table.scan(snapshot_id=snapshot.snapshot_id).plan_files()) if snapshot else []
    if any(t.delete_files for t in tasks):
        raise ValueError(
            f"iceberg table {identifier}: its snapshot has delete files (merge-on-read); rewrite its data "
            "files (compaction) first, or embed a copy written without deletes"
        )
    return TableFiles([t.file.file_path for t in tasks], table.location(), str(snapshot.snapshot_id if snapshot else 0),
                      table.schema().as_arrow())  # fmt: skip


def iceberg_diff(
    identifier: str, props: dict[str, Any], since: int, now: int
) -> tuple[list[str], list[str]] | None:
    """(data files added, data files removed) from snapshot `since` to `now`; None when `since` has left
    the table's history (expired), so only hashing can tell what changed. A row of a copy-on-write table
    is in one data file of a snapshot: a file neither added nor removed holds the same rows in both."""
    table = catalog(props).load_table(identifier)
    if table.snapshot_by_id(since) is None:
        return None

    def files(snapshot: int) -> set[str]:
        return {t.file.file_path for t in table.scan(snapshot_id=snapshot).plan_files()}

    old, new = files(since), files(now)
    return sorted(new - old), sorted(old - new)


def delta_diff(uri: str, storage: dict[str, str], since: int, now: int) -> tuple[list[str], list[str]] | None:
    """(data files added, data files removed) from version `since` to `now`, from the table's log; None
    when `since` can no longer be loaded (its log entries cleaned up). A Delta data file is immutable and,
    without deletion vectors (refused), holds the same rows in every version that lists it."""
    from deltalake import DeltaTable

    try:
        old = set(DeltaTable(uri, version=since, storage_options=storage or None).file_uris())
    except Exception:  # noqa: BLE001 - deltalake raises its own errors for a version out of the log
        return None
    new = set(DeltaTable(uri, version=now, storage_options=storage or None).file_uris())
    return sorted(new - old), sorted(old - new)


def delta_has_version(uri: str, storage: dict[str, str], version: int) -> bool:
    """Whether `version` can still be loaded from the table's log (not cleaned up)."""
    from deltalake import DeltaTable

    try:
        DeltaTable(uri, version=version, storage_options=storage or None)
    except Exception:  # noqa: BLE001 - as in delta_diff
        return False
    return True


def table_diff(
    fmt: str, source: str, props: dict[str, Any], endpoint_url: str | None, since: int, now: int
) -> tuple[list[str], list[str]] | None:
    """What changed in a table's data files between two snapshots (Iceberg) or versions (Delta)."""
    if fmt == "iceberg":
        return iceberg_diff(source, props, since, now)
    return delta_diff(source, delta_storage(source, endpoint_url), since, now)


def delta_storage(source: str, endpoint_url: str | None) -> dict[str, str]:
    return (
        {"AWS_ENDPOINT_URL": endpoint_url, "AWS_ALLOW_HTTP": "true"} if endpoint_url and is_s3(source) else {}
    )


def delta_files(uri: str, storage: dict[str, str], pinned: int | None = None) -> TableFiles:
    """The data files of the current version, or of version `pinned`."""
    from deltalake import DeltaTable

    table = DeltaTable(uri, version=pinned, storage_options=storage or None)
    actions = pa.table(table.get_add_actions(flatten=True))
    if (
        "deletionVector.storageType" in actions.column_names
        and actions.column("deletionVector.storageType").null_count < actions.num_rows
    ):
        raise ValueError(f"delta table {uri}: some files have deletion vectors; run OPTIMIZE (purge) first")
    schema = pa.schema(table.schema().to_arrow())
    properties = {k: str(v) for k, v in table.metadata().configuration.items()}
    return TableFiles(list(table.file_uris()), uri, str(table.version()), schema, properties)


def table_files(
    fmt: str, source: str, props: dict[str, Any], endpoint_url: str | None, pinned: int | None = None
) -> TableFiles:
    if fmt == "iceberg":
        return iceberg_files(source, props, pinned)
    return delta_files(source, delta_storage(source, endpoint_url), pinned)


def file_infos(files: list[str], fs: pafs.FileSystem) -> list[pafs.FileInfo]:
    """FileInfos (sizes) of data file URIs, in the filesystem the actors read with."""
    return list(fs.get_file_info([strip_scheme(f.removeprefix("file://")) for f in files]))


def check_text_type(schema: pa.Schema, column: str, where: str) -> None:
    """A text column must hold strings; refused before any work otherwise."""
    kind = schema.field(column).type if column in schema.names else None
    if kind is not None and not (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or kind == pa.string_view()
    ):
        raise ValueError(f"input {where}: text column {column!r} is {kind}, not a string")


TAG = "rayembed.output"  # the output whose view the Iceberg table holds: a table property, and each commit's tag


def write_iceberg(
    identifier: str, props: dict[str, Any], output: str, base: str | None, view: Any, delta: Any
) -> dict[str, Any]:
    """Bring the Iceberg table `identifier` (created if missing) to the view of the version at `output`,
    in one commit that also records `output` in the table's properties; nothing if it is there already.

    A full run appends its rows (`view()`). An incremental one on top of the version the table holds
    (`base`) deletes the ids it re-embedded or found gone and adds its own rows (`delta()`: rows, ids); a
    table that holds another version (a night skipped, or never synced) is replaced by the whole view."""
    from pyiceberg.exceptions import NoSuchTableError
    from pyiceberg.expressions import In

    cat = catalog(props)
    try:
        table = cat.load_table(identifier)
    except NoSuchTableError:
        table = None
    at = table.properties.get(TAG) if table is not None else None
    tagged = table is not None and any(s.summary and s.summary.get(TAG) == output for s in table.snapshots())
    if at == output or tagged:
        return {"table": identifier, "mode": "none", "rows": 0, "deleted": 0, "applied": False}
    mode = "append" if base is None else "upsert" if table is not None and at == base else "replace"
    rows, gone = delta() if mode == "upsert" else (view(), [])
    if table is None:
        cat.create_namespace_if_not_exists(identifier.rsplit(".", 1)[0])
        table = cat.create_table(identifier, schema=iceberg_schema(rows.schema))
    rows, tag = rows.cast(iceberg_schema(rows.schema)), {TAG: output}
    with table.transaction() as tx:  # one catalog commit: readers see the old view or the new one
        if mode == "replace":
            tx.overwrite(rows, snapshot_properties=tag)
        elif gone:
            tx.overwrite(rows, overwrite_filter=In("id", gone), snapshot_properties=tag)  # type: ignore[call-arg, arg-type]
        elif rows.num_rows:
            tx.append(rows, snapshot_properties=tag)
        tx.set_properties({TAG: output})
    return {"table": identifier, "mode": mode, "rows": rows.num_rows, "deleted": len(gone), "applied": True}


def iceberg_schema(schema: pa.Schema) -> pa.Schema:
    """The rows' schema as Iceberg stores it: fixed-size vectors as lists, no Parquet metadata."""
    fields = [
        pa.field(f.name, pa.list_(f.type.value_type) if pa.types.is_fixed_size_list(f.type) else f.type)
        for f in schema
    ]
    return pa.schema(fields)
