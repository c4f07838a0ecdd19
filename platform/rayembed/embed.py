"""Embed job: Ray Data read -> actor pool calling `Embedder.encode` -> Parquet (local or s3://).

Output rows: `id` and `embedding` (fixed-size list: float32, int8, or uint8 bytes of packed bits for
binary); the schema metadata records model, dim, precision and normalisation.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from rayembed.config import EmbedConfig
from rayembed.io import strip_scheme
from rayembed.model import Embedder

ARROW_TYPES = {"float32": pa.float32(), "int8": pa.int8(), "binary": pa.uint8()}


def output_schema(model_name: str, dim: int, precision: str, id_type: pa.DataType) -> pa.Schema:
    width = dim // 8 if precision == "binary" else dim
    meta = {
        "rayembed.model": model_name,
        "rayembed.dim": str(dim),
        "rayembed.precision": precision,
        "rayembed.normalized": "true",
    }
    return pa.schema(
        [pa.field("id", id_type), pa.field("embedding", pa.list_(ARROW_TYPES[precision], width))],
        metadata=meta,
    )


def bad_rows(texts: list[Any]) -> list[int]:
    """Positions whose text is null, not a string, or blank."""
    return [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]


class EmbedBatch:
    """Ray Data UDF: one model per actor; every batch goes through `Embedder.encode`."""

    def __init__(self, cfg: dict[str, Any], device: str | None = None) -> None:
        self.cfg = EmbedConfig(**cfg)
        self.embedder = Embedder.load(self.cfg.model, device=device)
        self.dim = self.cfg.dim or self.embedder.dim

    def texts(self, batch: pa.Table) -> list[Any]:
        texts = batch.column(self.cfg.text_column).to_pylist()
        if self.cfg.title_column:
            titles = batch.column(self.cfg.title_column).to_pylist()
            texts = [
                f"{h or ''} {t}".strip() if isinstance(t, str) else t
                for h, t in zip(titles, texts, strict=True)
            ]
        return texts

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts, ids = self.texts(batch), batch.column(self.cfg.id_column)
        bad = bad_rows(texts)
        if bad:
            raise ValueError(
                f"{len(bad)} row(s) with null/empty/non-string {self.cfg.text_column!r}, "
                f"first id {ids[bad[0]].as_py()!r}"
            )
        c = self.cfg
        emb = self.embedder.encode(
            texts, dim=c.dim, precision=c.precision, batch_size=c.batch_size, max_tokens=c.max_tokens
        )
        schema = output_schema(self.embedder.name, self.dim, c.precision, ids.type)
        flat = pa.array(np.ascontiguousarray(emb).reshape(-1), type=ARROW_TYPES[c.precision])
        column = pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])
        return pa.Table.from_arrays([ids.combine_chunks(), column], schema=schema)


def plan_actors(cfg: EmbedConfig) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) from the cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus > 0 if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu:
        if not gpus:
            raise ValueError("use_gpu=true but the Ray cluster has no GPUs")
        return cfg.num_actors or gpus, 1.0, 1.0
    # One CPU stays free for read/write tasks; otherwise a small cluster deadlocks (actors hold every CPU).
    cpus = max(1, int(resources.get("CPU", 1)) - 1)
    actors = cfg.num_actors or max(1, cpus // 2)
    return actors, float(max(1, cpus // actors)), 0.0


def embed(cfg: EmbedConfig) -> dict[str, Any]:
    """Run the job on the current Ray cluster (starting a local one if none); returns a summary."""
    import dataclasses

    import ray
    import ray.data

    from rayembed.io import ensure_ray, filesystem, read_dataset, require_columns
    from rayembed.model import resolve_model_path

    resolve_model_path(cfg.model)
    fs = filesystem(cfg.output, cfg.s3_endpoint_url)
    prepare_output(cfg.output, fs, cfg.overwrite)
    ensure_ray()
    start = time.time()
    ds = read_dataset(cfg.input, cfg.s3_endpoint_url)
    columns = [cfg.id_column, cfg.text_column] + ([cfg.title_column] if cfg.title_column else [])
    require_columns(ds, columns, "embed")
    actors, cpus, gpus = plan_actors(cfg)
    out = ds.select_columns(columns).map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"cfg": dataclasses.asdict(cfg), "device": "cuda" if gpus else "cpu"},
        batch_format="pyarrow",
        batch_size=max(cfg.batch_size * 8, 256),
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
    )
    out.write_parquet(strip_scheme(cfg.output) if fs else cfg.output, filesystem=fs)
    return {
        "output": cfg.output,
        "rows": count_rows(cfg.output, cfg.s3_endpoint_url),
        "seconds": time.time() - start,
    }


def prepare_output(path: str, fs: Any, overwrite: bool) -> None:
    """Refuse to mix a new run into an existing output folder, unless asked to replace it."""
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    target = strip_scheme(path)
    found = fs.get_file_info(pafs.FileSelector(target, allow_not_found=True))
    if not found:
        return
    if not overwrite:
        raise ValueError(
            f"output {path} already holds {len(found)} file(s); pass overwrite=true to replace them"
        )
    fs.delete_dir_contents(target)


def count_rows(path: str, endpoint_url: str | None = None) -> int:
    """Rows in a Parquet folder, from the footers only."""
    import pyarrow.dataset as pads

    from rayembed.io import filesystem

    fs = filesystem(path, endpoint_url)
    return pads.dataset(strip_scheme(path) if fs else path, format="parquet", filesystem=fs).count_rows()
