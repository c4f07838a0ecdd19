"""How `rayembed embed` grows with the corpus: 10k, 100k and 1M documents in hundreds of files.

    .venv/bin/python tests/bench/bench_embed_scale.py [--sizes 10000 100000 1000000] [--files 200] [--s3-sizes 100000]

A tiny random BERT (2 layers, hidden 32, MiniLM's tokenizer) so the model is not the bottleneck and the
pipeline's own costs show. Corpus: SciFact documents and SNLI sentences repeated to the size (ids unique),
shuffled, split over `--files` JSONL files. Each size runs in a fresh subprocess (its own driver and
local Ray cluster), which reports: pipeline docs/s; a bare `Embedder.encode` loop over the same texts in
the same process, same chunks and torch threads, after the pipeline; the steady rate (rows committed
after the first fragment's marker over the time to the last marker); the driver's peak RSS while the
jobs run and its ru_maxrss up to ray.shutdown(); every embed actor's peak RSS (sampled with psutil);
the bookkeeping files (_manifest, _committed) count and bytes; and a rerun of the fully committed job (it must skip everything). `--s3-sizes` repeat sizes with input and
output on a moto S3 server on loopback (in memory: 1M documents there are left out). Figures:
docs/results/embed-scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from results import header

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))


def write_lake(lake: Path, size: int, files: int) -> None:
    from bench_embed import corpus  # type: ignore[import-not-found]

    base = corpus(5183, 9842)
    repeat = -(-size // len(base))
    rows = [{"id": f"{r['id']}-{k}", "text": r["text"]} for k in range(repeat) for r in base][:size]
    order = np.random.default_rng(0).permutation(len(rows))
    lake.mkdir(parents=True)
    per = -(-size // files)
    for f in range(files):
        part = order[f * per : (f + 1) * per]
        (lake / f"part-{f:04d}.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in part))


class PeakRSS:
    """Peak RSS of the embed actors (Ray names them ray::MapWorker(...EmbedFragments...)), of every Ray
    worker process (`ray::...`: actors and tasks) and of this process (the driver), sampled every 0.5 s
    while the jobs run."""

    def __init__(self) -> None:
        self.peak: dict[int, int] = {}
        self.workers: dict[int, int] = {}
        self.driver = 0
        self.stop = threading.Event()
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmd, mem = " ".join(p.info["cmdline"] or []), p.info["memory_info"]
                if mem and cmd.startswith("ray::"):
                    self.workers[p.pid] = max(self.workers.get(p.pid, 0), mem.rss)
                if mem and "EmbedFragments" in cmd:
                    self.peak[p.pid] = max(self.peak.get(p.pid, 0), mem.rss)
            time.sleep(0.5)


def steady_docs_s(out: str, endpoint: str | None) -> float | None:
    """Rows committed after the first marker / seconds from the first marker to the last (markers'
    mtimes): the pipeline's rate once its fixed start-up costs are paid. None where the listing has no
    mtimes (pyarrow's S3 listing)."""
    from rayembed.embed.manifest import COMMITTED, list_dir, read_json
    from rayembed.embed.rows import fs_for
    from rayembed.io import strip_scheme

    fs = fs_for(out, endpoint)
    marks = list_dir(fs, f"{strip_scheme(out)}/{COMMITTED}")
    if any(i.mtime is None for i in marks):
        return None
    marks.sort(key=lambda i: i.mtime)
    rows = sum(read_json(fs, i.path)["rows_out"] for i in marks[1:])
    return round(rows / (marks[-1].mtime - marks[0].mtime).total_seconds(), 1)


def one(size_dir: Path, model: Path, endpoint: str | None) -> dict[str, Any]:
    """One size, in this process: pipeline, rerun, bare loop."""
    import ray
    import torch

    from rayembed.config import EmbedConfig
    from rayembed.data.readers import read_jsonl
    from rayembed.embed import embed
    from rayembed.model import Embedder

    lake, out = str(size_dir / "lake"), str(size_dir / "out")
    if endpoint:
        from rayembed.io import upload_dir

        upload_dir(lake, f"s3://rayembed/{size_dir.name}/lake", endpoint)
        lake, out = f"s3://rayembed/{size_dir.name}/lake", f"s3://rayembed/{size_dir.name}/out"
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cfg = EmbedConfig(input=lake, output=out, model=str(model), progress=False, s3_endpoint_url=endpoint)
    sampler = PeakRSS()
    t = time.perf_counter()
    summary = embed(cfg)
    first = time.perf_counter() - t
    t = time.perf_counter()
    again = embed(cfg)
    rerun = time.perf_counter() - t
    sampler.stop.set()
    ray.shutdown()
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the bare loop's texts
    docs = summary["rows"]
    assert again["fragments_skipped"] == again["fragments"], again
    texts = [r["text"] for f in sorted((size_dir / "lake").glob("*.jsonl")) for r in read_jsonl(f)]
    embedder = Embedder.load(model, device="cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    for i in range(0, len(texts), cfg.chunk_rows):
        embedder.encode(texts[i : i + cfg.chunk_rows], batch_size=cfg.batch_size, max_tokens=cfg.max_tokens)
    bare = time.perf_counter() - t
    return {
        "docs": docs, "fragments": summary["fragments"], "pipeline_s": round(first, 2),
        "pipeline_docs_s": round(docs / first, 1), "bare_s": round(bare, 2), "bare_docs_s": round(len(texts) / bare, 1),
        "pipeline_vs_bare": round(bare / first, 3), "rerun_s": round(rerun, 2), "rerun_fraction": round(rerun / first, 4),
        "steady_docs_s": steady_docs_s(out, endpoint),
        "driver_peak_rss_mb": round(sampler.driver / 2**20, 1), "driver_maxrss_mb": round(maxrss_mb, 1),
        "actor_peak_rss_mb": sorted(round(v / 2**20, 1) for v in sampler.peak.values()),
        "bookkeeping": bookkeeping(out, endpoint), "plan": summary["plan"],
    }  # fmt: skip


def bookkeeping(out: str, endpoint: str | None) -> dict[str, int]:
    """Count and bytes of the exactly-once files: the manifest and the commit markers."""
    import pyarrow.fs as pafs

    from rayembed.embed.rows import fs_for
    from rayembed.io import strip_scheme

    fs = fs_for(out, endpoint)
    infos = fs.get_file_info(pafs.FileSelector(strip_scheme(out), recursive=True))
    marks = [
        i
        for i in infos
        if i.type == pafs.FileType.File and ("/_committed/" in i.path or i.path.endswith("_manifest.json"))
    ]
    return {"files": len(marks), "bytes": sum(i.size or 0 for i in marks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--s3-sizes", type=int, nargs="*", default=[100_000])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--one", nargs=3, metavar=("DIR", "MODEL", "ENDPOINT"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "embed-scale.json"))
    args = ap.parse_args()
    if args.one:
        size_dir, model, endpoint = args.one
        print("RESULT " + json.dumps(one(Path(size_dir), Path(model), None if endpoint == "-" else endpoint)))
        return
    from conftest import build_tiny

    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-scale-"))
    model = build_tiny(tmp / "tiny")
    results: dict[str, Any] = {"local": {}, "s3": {}}
    server = None
    for where, sizes in (("local", args.sizes), ("s3", args.s3_sizes)):
        endpoint = "-"
        if where == "s3" and sizes:
            from moto.server import ThreadedMotoServer

            server = ThreadedMotoServer(ip_address="127.0.0.1", port=5123, verbose=False)
            server.start()
            endpoint = "http://127.0.0.1:5123"
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="rayembed")
        for size in sizes:
            size_dir = tmp / f"{where}-{size}"
            write_lake(size_dir / "lake", size, args.files)
            done = subprocess.run([sys.executable, __file__, "--one", str(size_dir), str(model), endpoint],
                                  capture_output=True, text=True, env=os.environ | {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"})  # fmt: skip
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            results[where][str(size)] = json.loads(line[7:]) if line else {"error": done.stderr[-2000:]}
            print(where, size, json.dumps(results[where][str(size)]), file=sys.stderr)
    if server:
        server.stop()
    local = results["local"]

    def ratio(a: str, key: str, b: str | None = None, key_b: str | None = None) -> float | None:
        try:
            return round(local[a][key] / local[b or a][key_b or key], 3) if b else round(local[a][key], 4)
        except (KeyError, TypeError, ZeroDivisionError):
            return None

    out = {
        **header("embed-scale"),
        "model": "random BERT, 2 layers, hidden 32, MiniLM's tokenizer", "files": args.files, "results": results,
        "pipeline_vs_bare_1m": ratio("1000000", "pipeline_vs_bare"),
        "docs_s_1m_vs_100k": ratio("1000000", "pipeline_docs_s", "100000"),
        "steady_docs_s_1m_vs_100k": ratio("1000000", "steady_docs_s", "100000"),
        "driver_rss_1m_vs_100k": ratio("1000000", "driver_peak_rss_mb", "100000"),
        "driver_maxrss_1m_vs_100k": ratio("1000000", "driver_maxrss_mb", "100000"),
        "rerun_fraction_1m": ratio("1000000", "rerun_fraction"),
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
