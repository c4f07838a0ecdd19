"""Peak memory per training worker as the contrastive batch grows, plain vs GradCache (prints JSON).

    .venv/bin/python tests/bench/bench_gradcache.py [--sizes 64 256 1024] [--chunk 32] [--steps 2]

Each point is a real `rayembed train` run (bundled all-MiniLM-L6-v2, 2 CPU Ray Train workers, DeepSpeed
ZeRO-2, SNLI triples with hard negatives gathered across workers, max_length 32) in fresh worker
processes; `peak_mem_mb` is rank 0's peak RSS (on GPU: peak CUDA allocation). Sizes are global batches
(2 workers x per-worker batch). Not a timed test: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rayembed.config import SHARED_DATA, TrainConfig
from rayembed.data.prepare import prepare
from rayembed.train import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=args.workers + 2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gradcache-"))
    data = tmp / "snli.jsonl"
    prepare("snli", f"{SHARED_DATA}/snli-esnli", str(data), split="dev", limit=max(args.sizes) * args.steps)
    rows = []
    # GradCache first: a plain run that exhausts memory (Ray's monitor kills it) goes last, so it
    # cannot disturb the other points.
    for chunk in (args.chunk, None):
        for size in args.sizes:
            per_worker = size // args.workers
            name = f"b{size}-{'gc' if chunk else 'plain'}"
            cfg = TrainConfig(
                data=str(data), output_dir=str(tmp / name), run_name=name, num_workers=args.workers,
                zero_stage=2, negative_column="negative", batch_size=per_worker,
                grad_cache_chunk=min(chunk, per_worker) if chunk else None, max_length=32,
                max_steps=args.steps, checkpoint_every=10**6,
            )  # fmt: skip
            start = time.perf_counter()
            try:
                result = train(cfg)
                point = {"peak_mem_mb": round(result["peak_mem_mb"]), "loss": round(result["loss"], 4)}
            except Exception as e:  # e.g. Ray's memory monitor killing a worker: that is the finding
                point = {
                    "peak_mem_mb": None,
                    "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                }
            rows.append(
                {"global_batch": size, "mode": "gradcache" if chunk else "plain", **point,
                 "wall_s": round(time.perf_counter() - start, 1)}
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    first, last = min(args.sizes), max(args.sizes)
    peak = {(r["global_batch"], r["mode"]): r["peak_mem_mb"] for r in rows}
    growth = {
        m: round(peak[(last, m)] / peak[(first, m)], 3) if peak[(last, m)] and peak[(first, m)] else None
        for m in ("plain", "gradcache")
    }
    print(json.dumps({"rows": rows, f"peak_ratio_{last}_vs_{first}": growth}, indent=2))


if __name__ == "__main__":
    main()
