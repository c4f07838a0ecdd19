"""Training samples/s on mixed-length text: one padded forward pass per tower vs `forward_tokens`.

    .venv/bin/python tests/bench/bench_train_forward.py [--rows 1536] [--steps 12] [--forward-tokens 4096]

The distillation recipe of jobs/distill.yaml (3-layer student of all-MiniLM-L6-v2 against its teacher's
vectors, ZeRO-2 on 2 CPU Ray Train workers, batch 32 each, max_length 256) on the first rows of the
general mix (Wikipedia paragraphs among short sentences), trained twice in one run: `forward_tokens`
unset (each tower padded to its longest row) and set (length-sorted pieces, model.batching.by_length).
samples/s over the steps after the first `--warmup`, from rank 0's history. Figures:
docs/results/train-forward.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from results import header

ROOT = Path(__file__).resolve().parents[2]


def teacher_vectors(rows: int, out: Path) -> dict[str, float]:
    """The mix's first `rows` texts with the teacher's vectors (what `rayembed embed` would write)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayembed.config import SHARED_DATA
    from rayembed.data.mix import general_texts
    from rayembed.model import Embedder

    texts = [r["text"] for r in general_texts(SHARED_DATA)[:rows]]
    teacher = Embedder.load("default", device="cpu")
    tokens = teacher.tokenize_ids(texts)  # once: the lengths and the vectors
    vectors = teacher.encode(tokens)
    out.mkdir(parents=True)
    pq.write_table(pa.table({"text": texts, "embedding": list(vectors)}), out / "part-0.parquet")
    lengths = [len(ids) for ids in tokens.ids]
    return {"mean_tokens": round(sum(lengths) / len(lengths), 1), "max_tokens": max(lengths)}


def point(forward_tokens: int | None, args: argparse.Namespace, data: Path, tmp: Path) -> dict[str, Any]:
    from rayembed.train.config import TrainConfig
    from rayembed.train.job import train

    cfg = TrainConfig(
        data=str(data), output_dir=str(tmp / f"run-{forward_tokens}"), model="default", student_layers=[0, 2, 5],
        loss="distill", teacher_column="embedding", text_column="text", matryoshka_dims=[384, 256, 128, 64],
        spread_out_weight=0.1, num_workers=2, zero_stage=2, batch_size=32, max_length=256, lr=1e-4,
        max_steps=args.steps, checkpoint_every=args.steps, report_interval_s=60, forward_tokens=forward_tokens,
    )  # fmt: skip
    result = train(cfg)
    history = json.loads((Path(result["report"]) / "report.json").read_text())["history"]
    first, last = history[args.warmup - 1], history[-1]
    steps = last["step"] - first["step"]
    return {
        "forward_tokens": forward_tokens,
        "samples_per_s": round(steps * 64 / (last["time_s"] - first["time_s"]), 2),
        "steps_timed": steps,
        "final_loss": round(result["loss"], 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--forward-tokens", type=int, default=4096)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "train-forward.json"))
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lengths = teacher_vectors(args.rows, tmp / "teacher")
        points = [point(ft, args, tmp / "teacher", tmp) for ft in (None, args.forward_tokens)]
    out = {
        **header(),
        "text": {"rows": args.rows, **lengths},
        "points": points,
        "speedup": round(points[1]["samples_per_s"] / points[0]["samples_per_s"], 2),
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
