"""Embed job: input fragments -> Ray Data actor pool calling `Embedder.encode` -> committed Parquet.

Exactly-once and resumable (see manifest.py): each fragment of the input (a JSONL file or a run of
Parquet row groups) is embedded by one actor, written to a deterministic file name and committed with a
marker; a rerun skips committed fragments, and a retried fragment overwrites its own file. Inside an
actor a background thread reads and tokenizes the next chunk while the model runs on the current one;
chunks are sorted by length and cut by a token budget (`Embedder.encode`).

Output rows: `id`, `embedding` (fixed-size list of float32, int8, or uint8 bytes of packed bits),
`truncated` (the text was cut at the model's max length) and any passthrough columns; the schema
metadata records model, revision, dim, precision and normalisation. Null/empty/non-string texts go to
`_rejects/` with the reason; counts, tokens, padding and speed go to `_summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayembed.config import EmbedConfig
from rayembed.io import filesystem, strip_scheme
from rayembed.manifest import (
    COMMITTED,
    REJECTS,
    TMP,
    Fragment,
    commit,
    list_dir,
    read_json,
    read_lines,
    staging_path,
)
from rayembed.model import Embedder

ARROW_TYPES = {"float32": pa.float32(), "int8": pa.int8(), "binary": pa.uint8()}


def fs_for(path: str, endpoint_url: str | None) -> pafs.FileSystem:
    return filesystem(path, endpoint_url) or pafs.LocalFileSystem()


def output_schema(meta: dict[str, str], dim: int, precision: str, base: pa.Schema) -> pa.Schema:
    """id (input type), embedding, truncated, then passthrough columns (`base` minus the text columns)."""
    width = dim // 8 if precision == "binary" else dim
    fields = [
        pa.field("id", base.field(0).type),
        pa.field("embedding", pa.list_(ARROW_TYPES[precision], width)),
        pa.field("truncated", pa.bool_()),
        *[base.field(i) for i in range(1, len(base))],
    ]
    return pa.schema(fields, metadata=meta)


def reject_reason(text: Any) -> str | None:
    if text is None:
        return "null"
    if not isinstance(text, str):
        return f"non-string ({type(text).__name__})"
    return None if text.strip() else "empty"


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

    def __init__(self, cfg: dict[str, Any], meta: dict[str, str], device: str, threads: int) -> None:
        import torch

        threads = cores_for(threads)
        torch.set_num_threads(threads)
        self.cfg = c = EmbedConfig(**cfg)
        dtype = getattr(torch, c.gpu_dtype if device == "cuda" else c.cpu_dtype)
        self.embedder = Embedder.load(c.model, device=device, dtype=dtype)
        self.embedder.tokenize_threads = threads
        self.meta = meta
        self.in_fs, self.out_fs = fs_for(c.input, c.s3_endpoint_url), fs_for(c.output, c.s3_endpoint_url)
        self.root = strip_scheme(c.output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [self.process(Fragment(**json.loads(str(s)))) for s in batch["fragment"]]
        return {"stats": np.array([json.dumps(s) for s in out], dtype=object)}

    def read(self, frag: Fragment) -> Iterator[pa.Table]:
        c = self.cfg
        cols = needed_columns(c)
        if frag.fmt == "parquet":
            pf = pq.ParquetFile(self.in_fs.open_input_file(frag.path))
            check_columns(pf.schema_arrow.names, cols, frag.path)
            assert frag.row_groups is not None
            groups = list(range(*frag.row_groups))
            for b in pf.iter_batches(batch_size=c.chunk_rows, row_groups=groups, columns=cols):
                yield pa.Table.from_batches([b])
            return
        import pyarrow.json as pajson

        data = read_lines(self.in_fs, frag)
        if not data.strip():  # a range holding no line start (one line longer than the range)
            return
        table = pajson.read_json(pa.BufferReader(data))
        check_columns(table.column_names, cols, frag.path)
        for b in table.select(cols).to_batches(max_chunksize=c.chunk_rows):
            yield pa.Table.from_batches([b])

    def prepare(self, table: pa.Table) -> tuple[pa.Table, pa.Table, Any]:
        """(rows to embed, rejected rows with reasons, their tokens): the CPU work, done ahead in a thread."""
        c = self.cfg
        texts = table.column(c.text_column).to_pylist()
        if c.title_column:
            titles = table.column(c.title_column).to_pylist()
            texts = [
                f"{h} {t}" if isinstance(h, str) and h.strip() and isinstance(t, str) else t
                for h, t in zip(titles, texts, strict=True)
            ]
        reasons = [reject_reason(t) for t in texts]
        good = [i for i, r in enumerate(reasons) if r is None]
        bad = [i for i, r in enumerate(reasons) if r is not None]
        ids = table.column(c.id_column)
        bad_idx, good_idx = pa.array(bad, pa.int64()), pa.array(good, pa.int64())
        rejects = pa.table(
            {
                "id": ids.take(bad_idx).cast(pa.string()),
                "reason": pa.array([reasons[i] for i in bad], pa.string()),
            }
        )
        keep = table.take(good_idx)
        tokens = self.embedder.tokenize_ids([texts[i] for i in good], c.prompt_name)
        return keep, rejects, tokens

    def process(self, frag: Fragment) -> dict[str, Any]:
        c, start = self.cfg, time.time()
        self.out_fs.create_dir(f"{self.root}/{TMP}", recursive=True)
        stats: Counter[str] = Counter()
        writers: dict[
            str, tuple[str, Any, pq.ParquetWriter]
        ] = {}  # final relative path -> (temp, stream, writer)
        reject_tables = []
        for keep, rejects, tokens in background(self.prepare(t) for t in self.read(frag)):
            stats["rows_in"] += keep.num_rows + rejects.num_rows
            for reason in rejects.column("reason").to_pylist():
                stats[f"rejected:{reason}"] += 1
            reject_tables.append(rejects)
            if not keep.num_rows:
                continue
            emb = self.embedder.encode(tokens, c.dim, c.precision, c.batch_size, c.max_tokens, stats)
            stats["rows_out"] += keep.num_rows
            stats["truncated"] += sum(tokens.truncated)
            self.write(frag, keep, emb, tokens.truncated, writers)
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

    def write(
        self, frag: Fragment, keep: pa.Table, emb: np.ndarray, truncated: list[bool], writers: dict[str, Any]
    ) -> None:
        c = self.cfg
        flat = pa.array(np.ascontiguousarray(emb).reshape(-1), type=ARROW_TYPES[c.precision])
        table = pa.table(
            {
                "id": keep.column(c.id_column),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]),
                "truncated": pa.array(truncated, pa.bool_()),
                **{x: keep.column(x) for x in c.passthrough_columns if x != c.id_column},
            }
        )
        dim = int(self.meta["rayembed.dim"])
        schema = output_schema(
            self.meta, dim, c.precision, table.drop_columns(["embedding", "truncated"]).schema
        )
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


def needed_columns(c: EmbedConfig) -> list[str]:
    named = [c.id_column, c.text_column, c.title_column, *c.passthrough_columns, c.partition_by]
    return list(dict.fromkeys(x for x in named if x))


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


def check_columns(names: list[str], needed: list[str], where: str) -> None:
    missing = [c for c in needed if c not in names]
    if missing:
        raise ValueError(f"input {where} lacks column(s) {missing}; it has {names}")


def plan_actors(cfg: EmbedConfig, fragments: int) -> tuple[int, float, float, int]:
    """(actors, CPUs per actor, GPUs per actor, threads per actor) from the cluster's resources."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return plan_for(cfg, fragments, nodes, int(ray.available_resources().get("CPU", 0)))


def plan_for(
    cfg: EmbedConfig, fragments: int, nodes: list[dict[str, float]], free: int
) -> tuple[int, float, float, int]:
    """`plan_actors` for these alive nodes' resources and `free` CPUs."""
    gpus = int(sum(r.get("GPU", 0) for r in nodes))
    use_gpu = gpus > 0 if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu:
        if not gpus:
            raise ValueError("use_gpu=true but the Ray cluster has no GPUs")
        # A GPU waits on tokenizing (docs/benchmarks.md): each GPU actor takes its node's share of
        # CPUs, up to 8, as tokenizer threads.
        per_gpu = min(int(r.get("CPU", 0)) // int(r["GPU"]) for r in nodes if r.get("GPU", 0) >= 1)
        threads = cfg.threads_per_actor or max(1, min(8, per_gpu))
        return min(cfg.num_actors or gpus, fragments), float(threads), 1.0, threads
    node_cpus = [int(r.get("CPU", 0)) for r in nodes if r.get("CPU", 0) >= 1] or [1]
    # `free`: other jobs (e.g. Serve replicas) may hold some CPUs
    # By default one thread per actor (N one-thread actors out-ran N/2 two-thread ones, docs/benchmarks.md),
    # unless there are fewer fragments than CPUs: then the few actors share the free CPUs as threads.
    # An actor must fit on the smallest node and in what is free now.
    wanted = cfg.threads_per_actor or max(1, (free or 1) // max(1, min(fragments, free or 1)))
    threads = max(1, min(wanted, min(node_cpus), free or 1))
    actors = cfg.num_actors or max(1, min(sum(n // threads for n in node_cpus), free // threads))
    return max(1, min(actors, fragments)), float(threads), 0.0, threads


def settings_of(cfg: EmbedConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """(manifest settings: what shapes the vectors, Parquet schema metadata)."""
    from rayembed.manifest import model_revision
    from rayembed.model import resolve_model_path

    path = resolve_model_path(cfg.model)
    model = Embedder.load(path, device="cpu")
    dim = cfg.dim or model.dim
    if cfg.dim and cfg.dim > model.dim:
        raise ValueError(f"dim {cfg.dim} is larger than the model's {model.dim}")
    if cfg.precision == "binary" and dim % 8:
        raise ValueError(f"binary precision needs a dim divisible by 8, got {dim}")
    settings = {
        "model": model.name,
        "revision": model_revision(path),
        "dim": dim,
        "precision": cfg.precision,
        "normalized": model.normalize,
        "max_length": model.max_length,
        "text": [cfg.title_column, cfg.text_column],
        "prompt": model.with_prompt([""], cfg.prompt_name)[0],
        "id_column": cfg.id_column,
    }
    meta = {
        f"rayembed.{k}": str(v).lower() if isinstance(v, bool) else str(v)
        for k, v in settings.items()
        if k != "text"
    }
    return settings, meta


def embed(cfg: EmbedConfig) -> dict[str, Any]:
    """Run (or resume) the job on the current Ray cluster, starting a local one if none; returns the summary."""
    import ray.data

    from rayembed.io import ensure_ray
    from rayembed.manifest import list_fragments, open_output

    start = time.time()
    settings, meta = settings_of(cfg)
    in_fs, out_fs = fs_for(cfg.input, cfg.s3_endpoint_url), fs_for(cfg.output, cfg.s3_endpoint_url)
    root = strip_scheme(cfg.output)
    fragments = list_fragments(strip_scheme(cfg.input), in_fs, cfg.fragment_rows, cfg.fragment_bytes)
    check_columns(peek_columns(fragments[0], in_fs), needed_columns(cfg), fragments[0].path)  # fail fast
    done = open_output(root, out_fs, settings, cfg.overwrite)
    pending = [f for f in fragments if f.name not in done]
    run: Counter[str] = Counter()
    plan: dict[str, float] = {}  # this run's actors (none when everything was committed before)
    if pending:
        ensure_ray()
        actors, cpus, gpus, threads = plan_actors(cfg, len(pending))
        plan = {"actors": actors, "threads_per_actor": threads, "gpus_per_actor": gpus}
        items = [{"fragment": json.dumps(dataclasses.asdict(f))} for f in pending]
        out = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            EmbedFragments,
            batch_size=1,
            fn_constructor_kwargs={
                "cfg": dataclasses.asdict(cfg),
                "meta": meta,
                "device": "cuda" if gpus else "cpu",
                "threads": threads,
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus,
            num_gpus=gpus,
        )
        with _progress(len(pending), cfg.progress) as tick:
            for row in out.iter_rows():
                stats = json.loads(row["stats"])
                run.update(stats)
                tick(stats.get("rows_out", 0), run["rows_out"] / max(time.time() - start, 1e-9))
    out_fs.delete_dir(f"{root}/{TMP}") if out_fs.get_file_info(
        f"{root}/{TMP}"
    ).type == pafs.FileType.Directory else None
    summary = summarize(cfg, root, out_fs, run, fragments, len(fragments) - len(pending), time.time() - start)
    summary["plan"] = plan
    from rayembed.manifest import write_json

    write_json(out_fs, f"{root}/_summary.json", summary)
    return summary


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar over fragments (rows and docs/s in the postfix) as a context manager yielding tick()."""
    from contextlib import contextmanager

    from tqdm.auto import tqdm

    @contextmanager
    def bar() -> Iterator[Callable[[int, float], None]]:
        with tqdm(total=total, unit="fragment", disable=not enabled, desc="embed") as b:
            rows = 0

            def tick(n: int, rate: float) -> None:
                nonlocal rows
                rows += n
                b.update(1)
                b.set_postfix(rows=rows, docs_s=f"{rate:.0f}")

            yield tick

    return bar()


def summarize(
    cfg: EmbedConfig,
    root: str,
    fs: pafs.FileSystem,
    run: Counter[str],
    fragments: list[Fragment],
    skipped: int,
    wall: float,
) -> dict[str, Any]:
    """Totals over every committed fragment, plus this run's speed."""
    total: Counter[str] = Counter()
    for record in (read_json(fs, i.path) for i in list_dir(fs, f"{root}/{COMMITTED}")):
        total.update({k: v for k, v in record.items() if isinstance(v, int)})
    rejects = {k.split(":", 1)[1]: v for k, v in sorted(total.items()) if k.startswith("rejected:")}
    padded = total["padded_tokens"]
    return {
        "output": cfg.output,
        "fragments": len(fragments),
        "fragments_skipped": skipped,
        "rows_in": total["rows_in"],
        "rows": total["rows_out"],
        "rejected": sum(rejects.values()),
        "rejected_by_reason": rejects,
        "truncated": total["truncated"],
        "tokens": total["tokens"],
        "padding_ratio": round(1 - total["tokens"] / padded, 4) if padded else 0.0,
        "wall_s": round(wall, 2),
        "run_rows": run["rows_out"],
        "docs_per_s": round(run["rows_out"] / wall, 1) if wall else 0.0,
        "tokens_per_s": round(run["tokens"] / wall, 1) if wall else 0.0,
    }
