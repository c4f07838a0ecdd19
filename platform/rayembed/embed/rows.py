"""Reading an input fragment's rows, and what of them is embedded: shared by the embed actors and the
incremental plan's scan tasks (embed/plan.py), which import this without the model's libraries."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayembed.embed.config import EmbedConfig
from rayembed.embed.manifest import Fragment, read_lines
from rayembed.io import filesystem


def fs_for(path: str, endpoint_url: str | None) -> pafs.FileSystem:
    return filesystem(path, endpoint_url) or pafs.LocalFileSystem()


def reject_reason(text: Any) -> str | None:
    if text is None:
        return "null"
    if not isinstance(text, str):
        return f"non-string ({type(text).__name__})"
    return None if text.strip() else "empty"


def screen(c: EmbedConfig, table: pa.Table) -> tuple[list[Any], list[int], pa.Table]:
    """(what each row embeds, the rows with a text, the others with their reason as a table (id, reason)):
    the one rule the actors and the incremental plan's scan both apply."""
    texts = texts_of(c, table)
    reasons = [reject_reason(t) for t in texts]
    good = [i for i, r in enumerate(reasons) if r is None]
    bad = [i for i, r in enumerate(reasons) if r is not None]
    rejects = {"id": table.column(c.id_column).take(pa.array(bad, pa.int64())).cast(pa.string()),
               "reason": pa.array([reasons[i] for i in bad], pa.string())}  # fmt: skip
    return texts, good, pa.table(rejects)


def needed_columns(c: EmbedConfig) -> list[str]:
    named = [c.id_column, c.text_column, c.title_column, *c.passthrough_columns, c.partition_by]
    return list(dict.fromkeys(x for x in named if x))


def check_columns(names: list[str], needed: list[str], where: str) -> None:
    missing = [c for c in needed if c not in names]
    if missing:
        raise ValueError(f"input {where} lacks column(s) {missing}; it has {names}")


def read_fragment(c: EmbedConfig, fs: pafs.FileSystem, frag: Fragment) -> Iterator[pa.Table]:
    """A fragment's rows (the columns the job needs), `chunk_rows` at a time."""
    cols = needed_columns(c)
    if frag.fmt == "parquet":
        pf = pq.ParquetFile(fs.open_input_file(frag.path))
        check_columns(pf.schema_arrow.names, cols, frag.path)
        assert frag.row_groups is not None
        groups = list(range(*frag.row_groups))
        for b in pf.iter_batches(batch_size=c.chunk_rows, row_groups=groups, columns=cols):
            yield plain_strings(pa.Table.from_batches([b]))
        return
    import pyarrow.json as pajson

    data = read_lines(fs, frag)
    if not data.strip():  # a range holding no line start (one line longer than the range)
        return
    table = pajson.read_json(pa.BufferReader(data))
    check_columns(table.column_names, cols, frag.path)
    for b in table.select(cols).to_batches(max_chunksize=c.chunk_rows):
        yield pa.Table.from_batches([b])


def plain_strings(table: pa.Table) -> pa.Table:
    """string_view columns (files delta-rs rewrites hold them) as plain strings: Arrow's take and filter
    kernels lack string_view."""
    if not any(f.type == pa.string_view() for f in table.schema):
        return table
    fields = [pa.field(f.name, pa.string()) if f.type == pa.string_view() else f for f in table.schema]
    return table.cast(pa.schema(fields))


def texts_of(c: EmbedConfig, table: pa.Table) -> list[Any]:
    """What is embedded per row (and hashed): the title and the text, or the text."""
    texts = table.column(c.text_column).to_pylist()
    if c.title_column:
        titles = table.column(c.title_column).to_pylist()
        texts = [
            f"{h} {t}" if isinstance(h, str) and h.strip() and isinstance(t, str) else t
            for h, t in zip(titles, texts, strict=True)
        ]
    return texts
