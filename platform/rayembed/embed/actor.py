"""The embed job's Ray Data UDF: one model per actor; each input fragment is read, embedded with
`Embedder.encode`, written and committed.

Inside an actor a background thread reads and tokenizes the next chunk while the model runs on the
current one; chunks are sorted by length and cut by a token budget (`Embedder.encode`). Output rows:
`id`, `embedding` (fixed-size list of float32, int8, or uint8 bytes of packed bits), `truncated` (the
text was cut at the model's max length) and any passthrough columns; the schema metadata records model,
revision, dim, precision and normalisation. Null/empty/non-string texts go to `_rejects/` with the reason.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayembed.embed.config import EmbedConfig
from rayembed.embed.keys import todo_of
from rayembed.embed.manifest import REJECTS, TMP, Fragment, commit, staging_path
from rayembed.embed.plan import commit_unchanged
from rayembed.embed.rows import fs_for, read_fragment, screen
from rayembed.embed.versions import content_hash
from rayembed.io import strip_scheme
from rayembed.model import Embedder, Tokens, chunking, resolve_model_path

ARROW_TYPES = {"float32": pa.float32(), "int8": pa.int8(), "binary": pa.uint8()}


CHUNK_FIELDS = [pa.field("chunk", pa.int32()), pa.field("start", pa.int64()), pa.field("end", pa.int64()),
                pa.field("tokens", pa.int32())]  # fmt: skip


def output_schema(
    meta: dict[str, str], dim: int, precision: str, base: pa.Schema, chunked: bool = False
) -> pa.Schema:
    """id (input type), (chunked: chunk, start, end, tokens), embedding, truncated, content_hash, then
    passthrough columns (`base` minus the text columns)."""
    width = dim // 8 if precision == "binary" else dim
    fields = [
        pa.field("id", base.field(0).type),
        *(CHUNK_FIELDS if chunked else []),
        pa.field("embedding", pa.list_(ARROW_TYPES[precision], width)),
        pa.field("truncated", pa.bool_()),
        pa.field("content_hash", pa.string()),  # what was embedded (embed/versions.py)
        *[base.field(i) for i in range(1, len(base))],
    ]
    return pa.schema(fields, metadata=meta)


def store_error(e: BaseException) -> bool:
    """An error of the store or the network (worth redoing the fragment), not of the data or the code:
    OSError (pyarrow's and fsspec's I/O errors) or botocore's, anywhere in the exception's chain."""
    while e is not None:
        if isinstance(e, OSError) or any(c.__module__.startswith("botocore") for c in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def background(gen: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run a generator in a thread, `depth` items ahead of the consumer; its errors re-raise here."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)

    def run() -> None:
        try:
            for item in gen:
                q.put(("item", item))
            q.put(("done", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(("error", e))

    threading.Thread(target=run, daemon=True).start()
    while True:
        kind, value = q.get()
        if kind == "done":
            return
        if kind == "error":
            raise value
        yield value


def cores_for(threads: int) -> int:
    """`threads`, but no more than the cores this process may run on: a local cluster has more logical
    CPUs (scheduling slots) than cores, and more torch threads than cores only slows the model down."""
    return max(1, min(threads, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else threads))


class EmbedFragments:
    """Ray Data UDF on an actor: one model per actor; each fragment is embedded, written and committed."""

    def __init__(
        self, cfg: dict[str, Any], meta: dict[str, str], device: str, threads: int, planned: bool = False
    ) -> None:
        import torch

        self.planned = planned  # an incremental run: each fragment embeds the ids its plan lists

        self.threads = threads = cores_for(threads)
        torch.set_num_threads(threads)
        self.cfg = c = EmbedConfig(**cfg)
        dtype = getattr(torch, c.gpu_dtype if device == "cuda" else c.cpu_dtype)
        self.embedder = Embedder.load(
            resolve_model_path(c.model, c.s3_endpoint_url), device=device, dtype=dtype
        )
        self.embedder.tokenize_threads = threads
        self.embedder.set_reach(c.max_length, c.rope_scaling)
        self.meta = meta
        self.in_fs, self.out_fs = fs_for(c.input, c.s3_endpoint_url), fs_for(c.output, c.s3_endpoint_url)
        self.root = strip_scheme(c.output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [self.attempt(Fragment(**json.loads(str(s)))) for s in batch["fragment"]]
        return {
            "stats": np.array([json.dumps(s) for s in out], dtype=object),
            "threads": np.full(len(out), self.threads),  # torch threads this actor runs (its plan)
        }

    def attempt(self, frag: Fragment) -> dict[str, Any]:
        """`process(frag)`, redone from scratch when the store fails it past the client's own retries
        (botocore retries a throttled or failed request 4 times in ~2 s): up to `store_retries` times,
        waiting 2, 4, 8, ... s. Safe: nothing of a fragment is visible before its commit marker, and its
        final names are fixed. Counted as `store_retries`."""
        for attempt in range(self.cfg.store_retries + 1):
            try:
                stats = self.process(frag)
                return stats | ({"store_retries": attempt} if attempt else {})
            except Exception as e:
                if attempt == self.cfg.store_retries or not store_error(e):
                    raise
                wait = 2.0 ** (attempt + 1)
                print(f"embed: fragment {frag.name}: the store failed ({type(e).__name__}: {e}); "
                      f"redoing it in {wait:g} s ({attempt + 1}/{self.cfg.store_retries})", flush=True)  # fmt: skip
                time.sleep(wait)
        raise AssertionError("unreachable")

    def prepare(self, table: pa.Table) -> tuple[pa.Table, pa.Table, Any, pa.Array, int]:
        """(rows to embed, rejected rows with reasons, their tokens, their content hashes, rows unchanged
        since the previous version): the CPU work, done ahead in a thread."""
        c = self.cfg
        texts, good, rejects = screen(c, table)
        keep, unchanged = table.take(pa.array(good, pa.int64())), 0
        if self.todo is not None:  # only the ids the plan lists (new ids and changed texts)
            ids_kept = keep.column(c.id_column).cast(pa.string()).to_pylist()
            fresh = [i for i, k in enumerate(ids_kept) if k in self.todo]
            unchanged = keep.num_rows - len(fresh)
            keep, good = keep.take(pa.array(fresh, pa.int64())), [good[i] for i in fresh]
        hashes = content_hash([texts[i] for i in good])
        todo = [texts[i] for i in good]
        tokens: Tokens | chunking.Plan
        if c.chunking:  # the chunk plan (and a plain chunk's tokens): CPU work, ahead of the model
            tokens = chunking.prepare(self.embedder, todo, c.chunking, c.chunk_tokens, c.chunk_overlap,
                                      c.chunk_boundary, c.prompt_name)  # fmt: skip
        else:
            tokens = self.embedder.tokenize_ids(todo, c.prompt_name)
        return keep, rejects, tokens, hashes, unchanged

    def process(self, frag: Fragment) -> dict[str, Any]:
        start = time.time()
        self.out_fs.create_dir(f"{self.root}/{TMP}", recursive=True)
        stats: Counter[str] = Counter()
        writers: dict[
            str, tuple[str, Any, pq.ParquetWriter]
        ] = {}  # final relative path -> (temp, stream, writer)
        reject_tables = []
        # an incremental run: the ids its plan has this fragment embed (embed/keys.py)
        self.todo = todo_of(self.out_fs, self.root, frag.name) if self.planned else None
        if self.todo is not None and not self.todo:
            return self.unchanged(frag, start)
        batches = read_fragment(self.cfg, self.in_fs, frag)
        for keep, rejects, tokens, hashes, unchanged in background(self.prepare(t) for t in batches):
            stats["rows_in"] += keep.num_rows + rejects.num_rows + unchanged
            stats["unchanged"] += unchanged
            for reason in rejects.column("reason").to_pylist():
                stats[f"rejected:{reason}"] += 1
            reject_tables.append(rejects)
            if not keep.num_rows:
                continue
            stats["rows_out"] += keep.num_rows
            keep, emb, cut, hashes, extra = self.embed_rows(keep, tokens, hashes, stats)
            stats["truncated"] += sum(cut)
            self.write(frag, keep, emb, cut, hashes, writers, extra)
        staged = {}
        for final, (tmp, stream, w) in writers.items():
            w.close()
            stream.close()  # ParquetWriter does not close a stream it was handed; S3 uploads on close
            staged[tmp] = final
        rejected = pa.concat_tables(reject_tables) if reject_tables else None
        if rejected is not None and rejected.num_rows:
            tmp = staging_path(self.root, frag.name)
            with self.out_fs.open_output_stream(tmp) as f:
                pq.write_table(
                    rejected.append_column("fragment", pa.array([frag.key] * rejected.num_rows)), f
                )
            staged[tmp] = f"{REJECTS}/{frag.name}"
        stats["seconds_x1000"] = int(1000 * (time.time() - start))
        commit(self.out_fs, self.root, frag, staged, dict(stats))
        return dict(stats)

    def unchanged(self, frag: Fragment, start: float) -> dict[str, Any]:
        """A fragment with nothing to embed (a plan made before the driver committed those itself)."""
        stats = commit_unchanged(self.out_fs, self.root, frag)
        return stats | {"seconds_x1000": int(1000 * (time.time() - start))}

    def embed_rows(
        self, keep: pa.Table, tokens: Any, hashes: pa.Array, stats: Counter[str]
    ) -> tuple[pa.Table, np.ndarray, list[bool], pa.Array, dict[str, list[int]]]:
        """(rows, vectors, cut at max length, content hashes, chunk columns): one row per text, or with
        `chunking` one per chunk (its text's columns and hash repeated)."""
        c = self.cfg
        if not c.chunking:
            emb = self.embedder.encode(tokens, c.dim, c.precision, c.batch_size, c.max_tokens, stats)
            return keep, emb, tokens.truncated, hashes, {}
        plan, emb, cut = chunking.encode_chunks(
            self.embedder, tokens, dim=c.dim, precision=c.precision, batch_size=c.batch_size,
            max_tokens=c.max_tokens, stats=stats,
        )  # fmt: skip
        stats["chunks_out"] += len(plan.doc)
        rows = pa.array(plan.doc, pa.int64())
        extra = {"chunk": plan.index, "start": plan.start, "end": plan.end, "tokens": plan.tokens}
        return keep.take(rows), emb, cut, hashes.take(rows), extra

    def write(
        self,
        frag: Fragment,
        keep: pa.Table,
        emb: np.ndarray,
        truncated: list[bool],
        hashes: pa.Array,
        writers: dict[str, Any],
        chunks: dict[str, list[int]],
    ) -> None:
        """Rows (one per text, or with `chunks` one per chunk: `keep` and `hashes` repeat their text's)."""
        c = self.cfg
        flat = pa.array(np.ascontiguousarray(emb).reshape(-1), type=ARROW_TYPES[c.precision])
        table = pa.table(
            {
                "id": keep.column(c.id_column),
                **{f.name: pa.array(chunks[f.name], f.type) for f in CHUNK_FIELDS if chunks},
                "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]),
                "truncated": pa.array(truncated, pa.bool_()),
                "content_hash": hashes,
                **{x: keep.column(x) for x in c.passthrough_columns if x != c.id_column},
            }
        )
        dim = int(self.meta["rayembed.dim"])
        base = table.drop_columns(
            ["embedding", "truncated", "content_hash", *(f.name for f in CHUNK_FIELDS if chunks)]
        )
        schema = output_schema(self.meta, dim, c.precision, base.schema, bool(chunks))
        table = table.select(schema.names).cast(schema)
        parts = [("", table)]
        if c.partition_by:
            values = keep.column(c.partition_by)
            parts = [
                (
                    f"{c.partition_by}={'__null__' if v is None else v}/",
                    table.filter(pc.is_null(values) if v is None else pc.equal(values, v)),
                )
                for v in values.unique().to_pylist()
            ]
        for prefix, part in parts:
            final = f"{prefix}{frag.name}"
            if final not in writers:
                tmp = staging_path(self.root, frag.name)
                stream = self.out_fs.open_output_stream(tmp)
                writers[final] = (tmp, stream, pq.ParquetWriter(stream, schema))
            writers[final][2].write_table(part)


def peek_columns(frag: Fragment, fs: pafs.FileSystem) -> list[str]:
    """Column names of a fragment's file (Parquet schema, or the keys of the first JSON lines)."""
    if frag.fmt == "parquet":
        return list(pq.read_schema(fs.open_input_file(frag.path)).names)
    with fs.open_input_stream(frag.path) as f:
        head = f.read(1 << 20).decode("utf-8", errors="ignore").splitlines()[:100]
    keys: dict[str, None] = {}
    for line in head[:-1] if len(head) > 1 else head:  # the last line may be cut
        if line.strip():
            try:
                keys.update(dict.fromkeys(json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"input {frag.path} is not JSON lines: {e.msg}") from None
    return list(keys)
