"""Distillation quality: a 3-layer student from all-MiniLM-L6-v2, trained on CPU, evaluated (prints JSON).

    .venv/bin/python tests/bench/bench_quality.py [--snli 4000] [--corpus 5183] [--epochs 1]

1. Text: SNLI sentences, SciFact train queries and SciFact corpus documents (no labels are used).
2. Teacher vectors by the batch pipeline (`rayembed embed`, text passed through).
3. `rayembed train`: student = the teacher's layers 0, 2, 5; loss = cosine alignment + similarity-matrix KL
   + spread-out, at Matryoshka widths 384/256/128/64; teacher vectors read from the column (ZeRO-2, 2 CPU workers).
   With `pca_rotation` (default; --no-pca-rotation to leave it out) the student gets an output layer set to
   the principal axes of the teacher's vectors and learns the teacher's vectors rotated alike.
4. nDCG@10 on SciFact test (full corpus) and Spearman on STS-B test for teacher, teacher-pca (the teacher
   rotated by the same axes), student before (as training starts) and after, at 384/256/128/64 and
   float32/int8/binary. Goals: student-after nDCG@10 >= 95% of the teacher's at full
   width; 128-d >= 95% of full; int8 >= 99% of float32.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from rayembed.config import SHARED_DATA, EmbedConfig, EvalConfig, TrainConfig
from rayembed.data.readers import read_jsonl, write_jsonl
from rayembed.embed import embed
from rayembed.eval.job import evaluate
from rayembed.model import Embedder
from rayembed.model.pca import principal_axes
from rayembed.train import train

LAYERS = [0, 2, 5]  # keeping the last layer matters: [0, 2, 4] starts at a third of the nDCG
DIMS = [256, 128, 64]


def texts(n_snli: int, n_corpus: int) -> list[dict[str, str]]:
    data = Path(SHARED_DATA)
    snli = dict.fromkeys(
        line.strip()
        for name in ("s1.dev", "s2.dev")
        for line in (data / "snli-esnli" / name).read_text().splitlines()
        if line.strip()
    )
    train_qids = {
        line.split("\t")[0]
        for line in (data / "scifact" / "qrels" / "train.tsv").read_text().splitlines()[1:]
    }
    queries = [q["text"] for q in read_jsonl(data / "scifact" / "queries.jsonl") if q["_id"] in train_qids]
    docs = [
        f"{d['title']} {d['text']}".strip()
        for d in islice(read_jsonl(data / "scifact" / "corpus.jsonl"), n_corpus)
    ]
    rows = [*islice(snli, n_snli), *queries, *docs]
    random.Random(0).shuffle(rows)  # mixed lengths and sources in every batch
    return [{"id": str(i), "text": t} for i, t in enumerate(rows)]


def table(name: str, report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, beir in report["beir"].items():
        if isinstance(beir, dict) and "ndcg@10" in beir:
            dim, _, precision = key.partition("-")
            out.append(
                {"model": name, "dim": int(dim), "precision": precision or "float32",
                 "ndcg@10": round(beir["ndcg@10"], 4), "sts_spearman": round(report["sts"][key]["spearman"], 4)}
            )  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--snli", type=int, default=4000)
    ap.add_argument("--corpus", type=int, default=5183, help="SciFact documents (5,183: all)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument(
        "--matryoshka-weights", type=float, nargs=4, default=None, help="weights of widths 384 256 128 64"
    )
    ap.add_argument("--no-pca-rotation", dest="pca_rotation", action="store_false")
    ap.add_argument("--seed", type=int, default=0, help="training seed (init of dropout, shuffling)")
    ap.add_argument(
        "--models", default="teacher,teacher-pca,student-before,student-after", help="which to evaluate"
    )
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    rows = texts(args.snli, args.corpus)
    write_jsonl(tmp / "texts.jsonl", rows)
    t0 = time.perf_counter()
    embed(
        EmbedConfig(
            input=str(tmp / "texts.jsonl"),
            output=str(tmp / "teacher"),
            passthrough_columns=["text"],
            progress=False,
        )
    )
    t1 = time.perf_counter()
    result = train(
        TrainConfig(
            data=str(tmp / "teacher"), output_dir=str(tmp / "run"), run_name="student3", model="default",
            student_layers=LAYERS, loss="distill", teacher_column="embedding", text_column="text",
            spread_out_weight=0.1, matryoshka_dims=[384, *DIMS], num_workers=2, zero_stage=2,
            batch_size=args.batch_size, max_length=args.max_length, lr=args.lr, warmup_steps=10,
            epochs=args.epochs, shuffle_buffer=2000, checkpoint_every=10**6,
            matryoshka_weights=args.matryoshka_weights, pca_rotation=args.pca_rotation, pca_rows=len(rows), seed=args.seed,
        )
    )  # fmt: skip
    t2 = time.perf_counter()
    cfg = EvalConfig(dims=DIMS, precisions=["float32", "int8", "binary"])
    vectors = pq.read_table(tmp / "teacher", columns=["embedding"])["embedding"].to_numpy(
        zero_copy_only=False
    )
    axes = principal_axes(np.stack(vectors))  # what training fits from the same rows
    rotate = (lambda m: m.rotate(axes)) if args.pca_rotation else (lambda m: m)
    loaders = {
        "teacher": lambda: Embedder.load("default"),
        "teacher-pca": lambda: Embedder.load("default").rotate(axes),
        "student-before": lambda: rotate(Embedder.load("default").keep_layers(LAYERS)),
        "student-after": lambda: Embedder.load(result["output_dir"]),
    }
    names = [n for n in args.models.split(",") if args.pca_rotation or n != "teacher-pca"]
    rows_out = [r for name in names for r in table(name, evaluate(cfg, loaders[name]()))]
    t3 = time.perf_counter()
    get = {(r["model"], r["dim"], r["precision"]): r for r in rows_out}

    def ratio(a: tuple[str, int, str], b: tuple[str, int, str], metric: str = "ndcg@10") -> float | None:
        if a not in get or b not in get:
            return None  # a model left out by --models
        return round(get[a][metric] / get[b][metric], 4)

    after, teacher = ("student-after", 384, "float32"), ("teacher", 384, "float32")
    goals = {
        "student_after_vs_teacher_full": ratio(after, teacher),
        "student_after_128_vs_full": ratio(("student-after", 128, "float32"), after),
        "student_after_int8_vs_float32": ratio(("student-after", 384, "int8"), after),
        "teacher_128_vs_full": ratio(("teacher", 128, "float32"), teacher),
        "teacher_pca_128_vs_full": ratio(("teacher-pca", 128, "float32"), teacher),
    }
    print(json.dumps({
        "pca_rotation": args.pca_rotation, "seed": args.seed, "matryoshka_weights": args.matryoshka_weights, "texts": len(rows), "steps": result["step"],
        "final_loss": round(result["loss"], 4),
        "seconds": {"teacher_vectors": round(t1 - t0), "train": round(t2 - t1), "eval": round(t3 - t2)},
        "goals": goals, "rows": rows_out,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
