"""Training steps/s when every step is reported to Ray Train vs at most every `report_interval_s`.

    .venv/bin/python tests/bench/bench_train_report.py [--steps 60] [--workers 2]

Ray Train (2.60, train v2) takes a worker's report through a queue of one slot that its controller
empties every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s), so a job that reports every step can run no faster
than one step per ~2 s once its steps are quicker than that (seen on an H100, docs/benchmarks.md). Here
the steps are made quick on CPU with a tiny random BERT (2 layers, hidden 32), 2 Ray Train workers,
DeepSpeed ZeRO-2, SNLI triples. Prints JSON; compare the two runs' steps/s within one invocation.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from rayembed.config import SHARED_DATA, TrainConfig
from rayembed.data.prepare import prepare
from rayembed.train import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    import ray

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import build_tiny

    ray.init(num_cpus=args.workers + 2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench-report-"))
    model = build_tiny(tmp / "tiny")
    data = tmp / "snli.jsonl"
    prepare("snli", f"{SHARED_DATA}/snli-esnli", str(data), split="dev", limit=8 * args.workers * args.steps)
    out: dict[str, object] = {}
    for interval in (0.0, 5.0):
        name = f"every-{interval:g}s"
        cfg = TrainConfig(
            data=str(data), output_dir=str(tmp / name), run_name=name, model=str(model),
            num_workers=args.workers, zero_stage=2, batch_size=8, max_length=32, max_steps=args.steps,
            checkpoint_every=10**6, report_interval_s=interval,
        )  # fmt: skip
        result = train(cfg)
        history = json.loads((Path(result["report"]) / "report.json").read_text())["history"]
        timed = history[4:]  # after start-up
        span = timed[-1]["time_s"] - timed[0]["time_s"]
        out[name] = {"steps": len(history), "steps_per_s": round((len(timed) - 1) / span, 2)}
        print(json.dumps({name: out[name]}), flush=True)
    slow, fast = (out[k]["steps_per_s"] for k in ("every-0s", "every-5s"))  # type: ignore[index]
    out["speedup_interval_5s_vs_every_step"] = round(fast / slow, 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
