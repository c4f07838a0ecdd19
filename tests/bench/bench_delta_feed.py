"""A night over a Delta table by its change data feed against the same night by its log's file diff.

    .venv/bin/python tests/bench/bench_delta_feed.py [--rows 1000000 4000000]

Per size, a Delta table (`delta.enableChangeDataFeed`) of short synthetic documents in files of 100k rows is
embedded whole (a real full run: the base). Then, through delta-rs: ~1 % of the texts updated (ids ending
in `00`: every file holds some, so every file is rewritten), ~0.1 % deleted (ids ending in `517`), ~1 %
appended. The same night runs twice from the base, each in a fresh subprocess with its own local Ray
cluster and RSS sampler (bench_incremental's): by the feed (the default) and by the log diff
(`change_feed=false`). Both must embed and delete the same counts. Then night 2 (another 1 % updated),
each path from its own night 1, whose key index (`_keys`) is the base's: the steady state. Figures:
docs/results/embed-delta-feed.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_incremental import FILE_ROWS, ROOT, run_one, texts  # type: ignore[import-not-found]  # noqa: E402
from results import header


def table(start: int, n: int, version: int) -> pa.Table:
    ids = np.arange(start, start + n, dtype=np.int64)
    return pa.table({"id": pa.array([f"d{i:010d}" for i in ids]), "text": texts(ids, np.full(n, version))})


def size_run(tmp: Path, model: Path, rows: int) -> dict[str, Any]:
    from deltalake import DeltaTable, write_deltalake

    lake = str(tmp / f"lake-{rows}")
    for start in range(0, rows, FILE_ROWS):
        write_deltalake(lake, table(start, min(FILE_ROWS, rows - start), 0), mode="append",
                        configuration={"delta.enableChangeDataFeed": "true"})  # fmt: skip
    common = {"input": lake, "input_format": "delta", "model": str(model), "id_column": "id",
              "progress": False, "max_length": 32}  # fmt: skip
    base = str(tmp / f"base-{rows}")
    result = {"full": run_one(common | {"output": base})}
    DeltaTable(lake).update({"text": "concat(text, ' (revised)')"}, predicate="id LIKE '%00'")
    DeltaTable(lake).delete("id LIKE '%517'")
    write_deltalake(lake, table(rows, rows // 100, 0), mode="append")
    expect = {"embedded": rows // 100 + rows // 100, "deleted": rows // 1000}
    night = common | {"incremental_from": base}
    result["feed"] = run_one(night | {"output": str(tmp / f"feed-{rows}")})
    result["log_diff"] = run_one(night | {"output": str(tmp / f"log-{rows}"), "change_feed": False})
    for path in ("feed", "log_diff"):
        got = result[path]
        assert (got["embedded"], got["deleted"]) == (expect["embedded"], expect["deleted"]), (
            path,
            got,
            expect,
        )
    result["expected"] = expect
    # night 2, the steady state: each path from its own night 1, whose `_keys` serve as the base's keys
    DeltaTable(lake).update({"text": "concat(text, ' (again)')"}, predicate="id LIKE '%01'")
    for path, out in (("feed", "feed"), ("log_diff", "log")):
        then = night | {"incremental_from": str(tmp / f"{out}-{rows}"), "output": str(tmp / f"{out}2-{rows}")}
        result[f"{path}_night2"] = run_one(then | ({} if path == "feed" else {"change_feed": False}))
        changed = len(range(1, rows + rows // 100, 100))  # the ids ending in 01, appended ones too
        assert result[f"{path}_night2"]["embedded"] == changed, result[f"{path}_night2"]
    result["night2_feed_vs_log_diff_speed"] = round(
        result["log_diff_night2"]["wall_s"] / result["feed_night2"]["wall_s"], 2
    )
    result["feed_vs_log_diff_speed"] = round(result["log_diff"]["wall_s"] / result["feed"]["wall_s"], 2)
    result["rows_read_feed_vs_log_diff"] = round(result["feed"]["rows_in"] / result["log_diff"]["rows_in"], 4)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "embed-delta-feed.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny

    tmp = Path(tempfile.mkdtemp(prefix="bench-delta-feed-"))
    model = build_tiny(tmp / "tiny")
    results = {}
    for rows in args.rows:
        results[str(rows)] = size_run(tmp, model, rows)
        print(rows, json.dumps(results[str(rows)]), file=sys.stderr, flush=True)
    out = {
        **header("embed-delta-feed"),
        "model": "random BERT, 2 layers, hidden 32, MiniLM's tokenizer, max_length 32",
        "table": f"Delta (delta-rs), rows in files of {FILE_ROWS}, change data feed on; the night: 1 % of "
                 "texts updated in every file, 0.1 % deleted, 1 % appended; base: a real full run",
        "results": results,
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    import shutil

    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
