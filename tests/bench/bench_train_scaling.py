"""Training samples/s and peak memory per worker with 1, 2 and 4 Ray Train workers, one per local node.

    .venv/bin/python tests/bench/bench_train_scaling.py [--workers 1 2 4] [--steps 12]
    python tests/bench/bench_train_scaling.py --gpu --workers 1 --out ...   # one GPU (tests/bench/gpu.sh)

Each point starts its own multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head with
no CPUs and one 2-CPU node per worker, workers placed SPREAD, so every worker is on its own node and talks
to the others over gloo through the loopback), trains the bundled all-MiniLM-L6-v2 contrastively (SNLI
triples, ZeRO-2, fp32, `batch_size` rows per worker, max_length 64) and reads rank 0's history: samples/s
is the global batch times the steps after the first `--warmup` ones over their time. Checkpoints go to a
folder every node sees (the same disk: `shared_storage`). On a machine with fewer cores than workers
the figure shows the cost of more workers, not a speed-up. Figures: docs/results/train-scaling.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from results import header

ROOT = Path(__file__).resolve().parents[2]


def point(workers: int, args: argparse.Namespace, data: Path, tmp: Path) -> dict[str, float]:
    import ray
    from ray.cluster_utils import Cluster

    from rayembed.train.config import TrainConfig
    from rayembed.train.job import train

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(workers):
        cluster.add_node(num_cpus=2, num_gpus=int(args.gpu))
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        cfg = TrainConfig(
            data=str(data), output_dir=str(tmp / f"w{workers}"), num_workers=workers, placement_strategy="SPREAD",
            shared_storage=True, zero_stage=2, negative_column="negative", batch_size=args.batch_size,
            max_length=64, lr=1e-5, max_steps=args.steps, checkpoint_every=args.steps, report_interval_s=60,
            use_gpu=args.gpu, precision="bf16" if args.gpu else "fp32",
        )  # fmt: skip
        started = time.perf_counter()
        result = train(cfg)
        wall = time.perf_counter() - started
        history = json.loads((Path(result["report"]) / "report.json").read_text())["history"]
    finally:
        ray.shutdown()
        cluster.shutdown()
    first, last = history[args.warmup - 1], history[-1]
    steps = last["step"] - first["step"]
    samples_s = steps * args.batch_size * workers / (last["time_s"] - first["time_s"])
    return {"samples_per_s": round(samples_s, 1), "peak_mem_mb": round(result["peak_mem_mb"], 1),
            "steps_timed": steps, "wall_s": round(wall, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 (tests/bench/gpu.sh)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "train-scaling.json"))
    args = ap.parse_args()

    from rayembed.data import SHARED_DATA
    from rayembed.data.prepare import prepare

    tmp = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    data = tmp / "snli.jsonl"
    prepare("snli", f"{SHARED_DATA}/snli-esnli", str(data), split="dev",
            limit=args.batch_size * max(args.workers) * (args.steps + 2))  # fmt: skip
    points = {}
    for n in args.workers:
        points[str(n)] = point(n, args, data, tmp)
        print(n, json.dumps(points[str(n)]), file=sys.stderr)
    one = points.get("1", {}).get("samples_per_s")
    out = {
        **header("train-scaling"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"}
        | {"model": "all-MiniLM-L6-v2", "zero_stage": 2},
        "workers": points,
        "speedup_vs_1": {n: round(p["samples_per_s"] / one, 2) for n, p in points.items()} if one else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
