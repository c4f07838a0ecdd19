"""What tracking costs a training run: steps/s untracked vs tracked into a real `mlflow server` on
loopback, in one invocation, runs interleaved (untracked, tracked, tracked, untracked, ...) so drift of
the machine falls on both: docs/results/tracking.json, `overhead` = 1 - tracked / untracked steps/s.

    .venv/bin/python tests/bench/bench_tracking.py [--steps 300] [--pairs 3] [--model tiny|default]

The run is the CI-sized contrastive run (2 workers, ZeRO-2) on SNLI triples: with the tiny model a step
takes tens of milliseconds, the worst case for a per-step cost; with the default MiniLM, a real one.
Steps/s come from rank 0's own step times (the run report's history), the first 10 steps left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from results import header  # noqa: E402

from conftest import DATA, build_tiny, start_mlflow_server  # noqa: E402

OUT = ROOT / "docs" / "results" / "tracking.json"


def steps_per_s(output_dir: Path, skip: int = 10) -> float:
    history = json.loads((output_dir / "report" / "report.json").read_text())["history"]
    t = [h["time_s"] for h in history]
    return (len(t) - 1 - skip) / (t[-1] - t[skip])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--pairs", type=int, default=3, help="untracked/tracked pairs, order alternating")
    args = parser.parse_args()
    import ray

    from rayembed.config import TrainConfig
    from rayembed.data.prepare import prepare
    from rayembed.train import train

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server, uri = start_mlflow_server(root / "mlflow")
        model = str(build_tiny(root / "tiny")) if args.model == "tiny" else "default"
        data = root / "snli.jsonl"
        prepare("snli", str(DATA / "snli-esnli"), str(data), split="dev", limit=args.steps * 16)
        runs: dict[str, list[float]] = {"untracked": [], "tracked": []}
        try:
            order = [
                k
                for i in range(args.pairs)
                for k in (("untracked", "tracked"), ("tracked", "untracked"))[i % 2]
            ]
            for i, kind in enumerate(order):
                cfg = TrainConfig(
                    data=str(data), output_dir=str(root / f"run{i}"), model=model, num_workers=2, zero_stage=2,
                    loss="symmetric_infonce", negative_column="negative", batch_size=8, max_length=32,
                    max_steps=args.steps, checkpoint_every=args.steps, lr=1e-4, run_name=f"bench{i}",
                    tracking={"uri": uri, "experiment": "bench"} if kind == "tracked" else None,
                )  # fmt: skip
                summary = train(cfg)
                runs[kind].append(round(steps_per_s(root / f"run{i}"), 3))
                if kind == "tracked":
                    assert summary["tracking"]["failed"] == summary["tracking"]["dropped"] == 0, summary
        finally:
            server.terminate()
    untracked, tracked = (sum(v) / len(v) for v in (runs["untracked"], runs["tracked"]))
    result = {
        **header(),
        "run": f"{args.model} model, 2 workers ZeRO-2, batch 8 per worker, max_length 32, {args.steps} steps; "
               "mlflow server (SQLite) on loopback, rank 0's metrics sent every tracking.interval_s (5 s)",
        "steps_per_s": runs, "overhead": round(1 - tracked / untracked, 4), "goal": 0.02,
        # each adjacent untracked/tracked pair's own overhead: drift between pairs falls out
        "pair_overheads": [round(1 - t / u, 4) for u, t in zip(runs["untracked"], runs["tracked"], strict=True)],
        "spread": {k: round((max(v) - min(v)) / (sum(v) / len(v)), 4) for k, v in runs.items()},
        "gpu": "not measured",
    }  # fmt: skip
    # the last run's figures at the top; each model's last run kept under by_model (tiny: the worst case)
    earlier = json.loads(OUT.read_text()).get("by_model", {}) if OUT.is_file() else {}
    result["by_model"] = earlier | {args.model: {k: v for k, v in result.items() if k != "by_model"}}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
