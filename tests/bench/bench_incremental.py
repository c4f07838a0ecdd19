"""The nightly incremental run at 1M, 10M and 30M ids: memory of the driver and of every Ray worker, and
the speed of a night with nothing changed against a full run.

    .venv/bin/python tests/bench/bench_incremental.py [--sizes 1000000 10000000 30000000]

Per size: a Parquet lake of short synthetic documents (100k rows a file); the base version; night 1 with
~10 % of the texts changed, ~1 % of the ids deleted and ~1 % new (`incremental_from` the base, whose keys
are scanned from its own files); night 2 on the same input (`incremental_from` night 1, whose `_keys`
serve: nothing changed). The base of the smallest size is a real full run (its speed is the full-run
figure); the larger bases are written by this script in the job's layout (same manifest settings, ids,
content hashes; zero vectors), since a full run of 30M rows takes hours on 2 cores. Each night runs in a
fresh subprocess (its own driver and local Ray cluster) that samples, every 0.5 s, its own RSS and that of
every Ray worker process (embed actors and the plan's tasks). A night's counts are checked against what
was changed. Figures: docs/results/embed-incremental.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from results import header

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
FILE_ROWS = 100_000
WORDS = np.array(
    [
        "lake",
        "night",
        "vector",
        "index",
        "table",
        "model",
        "query",
        "corpus",
        "shard",
        "token",
        "batch",
        "delta",
    ]
)


def texts(ids: np.ndarray, version: np.ndarray) -> pa.Array:
    """A short document per id (~12 words), different for each version number."""
    w = WORDS[(ids[:, None] * np.array([7, 11, 13, 17, 19, 23]) + version[:, None]) % len(WORDS)]
    return pa.array(
        [f"document {i} rev {v}: " + " ".join(r) for i, v, r in zip(ids, version, w, strict=True)]
    )


def night(size: int, which: int, changed: float, deleted: float, new: float) -> tuple[np.ndarray, np.ndarray]:
    """(ids, text version) of the lake on night `which` (0: the base)."""
    ids = np.arange(size + (int(size * new) if which else 0), dtype=np.int64)
    version = np.zeros(len(ids), np.int64)
    if which:
        rng = np.random.default_rng(size)
        version[rng.random(len(ids)) < changed] = 1
        keep = (rng.random(len(ids)) >= deleted) | (ids >= size)  # only old ids are deleted
        ids, version = ids[keep], version[keep]
    return ids, version


def write_lake(folder: Path, ids: np.ndarray, version: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for f, start in enumerate(range(0, len(ids), FILE_ROWS)):
        part, v = ids[start : start + FILE_ROWS], version[start : start + FILE_ROWS]
        table = pa.table({"id": pa.array([f"d{i:010d}" for i in part]), "text": texts(part, v)})
        pq.write_table(table, folder / f"part-{f:05d}.parquet")


def write_base(out: Path, lake: Path, cfg: Any) -> None:
    """The base version as the job would have written it (zero vectors): manifest, rows, summary."""
    from rayembed.embed.actor import output_schema
    from rayembed.embed.job import settings_of
    from rayembed.embed.manifest import write_json
    from rayembed.embed.versions import content_hash

    settings, meta, _ = settings_of(cfg)
    out.mkdir(parents=True)
    import pyarrow.fs as pafs

    fs = pafs.LocalFileSystem()
    write_json(fs, str(out / "_manifest.json"), {"settings": settings})
    dim = settings["dim"]
    for path in sorted(lake.glob("*.parquet")):
        t = pq.read_table(path)
        n = t.num_rows
        table = pa.table({
            "id": t.column("id"), "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * dim, np.float32)), dim),
            "truncated": pa.array(np.zeros(n, bool)), "content_hash": content_hash(t.column("text").to_pylist()),
        })  # fmt: skip
        schema = output_schema(meta, dim, "float32", table.select(["id"]).schema)
        pq.write_table(table.cast(schema), out / path.name)
    write_json(fs, str(out / "_summary.json"), {"rows": "written by bench_incremental.py"})


def one(spec: dict[str, Any]) -> dict[str, Any]:
    """One run of the job in this process, sampled (bench_embed_scale's sampler)."""
    import ray
    from bench_embed_scale import PeakRSS  # type: ignore[import-not-found]

    from rayembed.config import EmbedConfig
    from rayembed.embed import embed

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    sampler = PeakRSS()
    t = time.perf_counter()
    summary = embed(EmbedConfig(**spec))
    wall = time.perf_counter() - t
    sampler.stop.set()
    ray.shutdown()
    return {
        "wall_s": round(wall, 1), "rows_in": summary["rows_in"], "embedded": summary["rows"],
        "unchanged": summary["unchanged"], "deleted": summary.get("deleted"),
        "rows_in_per_s": round(summary["rows_in"] / wall, 1),
        "driver_peak_rss_mb": round(sampler.driver / 2**20, 1),
        "worker_peak_rss_mb": round(max(sampler.workers.values(), default=0) / 2**20, 1),
        "actor_peak_rss_mb": round(max(sampler.peak.values(), default=0) / 2**20, 1), "change_detection": summary.get("change_detection"),
    }  # fmt: skip


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(done.stderr[-3000:])
    return dict(json.loads(line[7:]))


def size_run(tmp: Path, model: Path, size: int, args: argparse.Namespace, full: bool) -> dict[str, Any]:
    from rayembed.config import EmbedConfig

    d = tmp / str(size)
    common = {"model": str(model), "id_column": "id", "progress": False, "max_length": 32,
              "bucket_ids": args.bucket_ids}  # fmt: skip
    ids0, v0 = night(size, 0, args.changed, args.deleted, args.new)
    write_lake(d / "lake0", ids0, v0)
    result: dict[str, Any] = {}
    if full:
        result["full"] = run_one({"input": str(d / "lake0"), "output": str(d / "base"), **common})
    else:
        t = time.perf_counter()
        write_base(
            d / "base", d / "lake0", EmbedConfig(input=str(d / "lake0"), output=str(d / "base"), **common)
        )
        result["base_written_s"] = round(time.perf_counter() - t, 1)
    ids1, v1 = night(size, 1, args.changed, args.deleted, args.new)
    write_lake(d / "lake1", ids1, v1)
    expect = {"embedded": int(((ids1 < size) & (v1 == 1)).sum() + (ids1 >= size).sum()),
              "deleted": int(size - (ids1 < size).sum())}  # fmt: skip
    n1 = {"input": str(d / "lake1"), "output": str(d / "n1"), "incremental_from": str(d / "base"), **common}
    result["night_changed"] = run_one(n1)
    result["expected"] = expect
    got = result["night_changed"]
    assert (got["embedded"], got["deleted"]) == (expect["embedded"], expect["deleted"]), (got, expect)
    result["night_unchanged"] = run_one(n1 | {"output": str(d / "n2"), "incremental_from": str(d / "n1")})
    assert result["night_unchanged"]["embedded"] == 0, result["night_unchanged"]
    import shutil

    shutil.rmtree(d)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 30_000_000])
    ap.add_argument("--changed", type=float, default=0.10)
    ap.add_argument("--deleted", type=float, default=0.01)
    ap.add_argument("--new", type=float, default=0.01)
    ap.add_argument("--bucket-ids", type=int, default=1_000_000, help="ids per range of the comparison")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "embed-incremental.json"))
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(json.loads(args.one))))
        return
    from conftest import build_tiny

    tmp = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    model = build_tiny(tmp / "tiny")
    results = {}
    for i, size in enumerate(args.sizes):
        results[str(size)] = size_run(tmp, model, size, args, full=i == 0)
        print(size, json.dumps(results[str(size)]), file=sys.stderr, flush=True)
    lo, hi = results[str(args.sizes[0])], results[str(args.sizes[-1])]

    def ratio(key: str) -> float:
        return round(hi["night_changed"][key] / lo["night_changed"][key], 3)

    out = {
        **header("embed-incremental"),
        "model": "random BERT, 2 layers, hidden 32, MiniLM's tokenizer, max_length 32",
        "lake": f"Parquet, {FILE_ROWS} rows a file, ~12-word synthetic documents; night 1: {args.changed:.0%} changed, "
                f"{args.deleted:.0%} deleted, {args.new:.0%} new",
        "sizes": args.sizes, "bucket_ids": args.bucket_ids, "results": results,
        "driver_rss_30m_vs_1m": ratio("driver_peak_rss_mb"), "actor_rss_30m_vs_1m": ratio("actor_peak_rss_mb"),
        "worker_rss_30m_vs_1m": ratio("worker_peak_rss_mb"),
        "unchanged_vs_full_speed": {
            str(s): round(r["night_unchanged"]["rows_in_per_s"] / lo["full"]["rows_in_per_s"], 2) for s, r in results.items()
        },
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
