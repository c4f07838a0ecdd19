"""First rows of a small Parquet folder through Ray Data: its V1 reader (what `rayembed.io.read_dataset`
plans since 2026-12-03) against 2.60's default DataSourceV2, and JSONL for scale; writes
docs/results/read-parquet.json.

    .venv/bin/python tests/bench/bench_read.py [--rows 200] [--repeats 5]

Each figure is the wall time from planning the read to the first batch in hand (what a training worker
waits before its first step, and the train driver before its checks), on a warm local Ray cluster,
median of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from results import header

OUT = Path(__file__).resolve().parents[2] / "docs" / "results" / "read-parquet.json"


def first_batch_s(read: object) -> float:
    t0 = time.perf_counter()
    ds = read()  # type: ignore[operator]
    next(iter(ds.iter_batches(batch_size=None, batch_format="numpy")))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    texts = [f"text {i}" for i in range(args.rows)]
    vectors = rng.standard_normal((args.rows, 384)).astype(np.float32)
    table = pa.table({"text": texts, "embedding": list(vectors)})
    (work / "parquet").mkdir()
    pq.write_table(table, work / "parquet" / "part-0.parquet")
    (work / "rows.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    context = ray.data.DataContext.get_current()

    def parquet(v2: bool) -> object:
        def read() -> object:
            context.use_datasource_v2 = v2
            return ray.data.read_parquet(str(work / "parquet"), file_extensions=["parquet"])

        return read

    cases = {
        "parquet_v2_default": parquet(True),
        "parquet_v1": parquet(False),
        "jsonl": lambda: ray.data.read_json(str(work / "rows.jsonl")),
    }
    for read in cases.values():  # warm-up: worker processes started, modules imported
        first_batch_s(read)
    seconds = {
        name: [round(first_batch_s(read), 3) for _ in range(args.repeats)] for name, read in cases.items()
    }
    medians = {name: round(statistics.median(v), 3) for name, v in seconds.items()}
    out = {
        **header(),
        "ray": ray.__version__,
        "rows": args.rows,
        "first_batch_s_median": medians,
        "first_batch_s": seconds,
        "v2_over_v1": round(medians["parquet_v2_default"] / medians["parquet_v1"], 1),
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
