"""Does the label-free retention check (eval/retention.py) track the true retention? On the labelled
collections no training text came from (SciFact test: 300 queries over 5,183 abstracts; SNLI-test as
retrieval: premises over every hypothesis), each student's true nDCG@10 retention (its nDCG@10 over the
teacher's, from the qrels) is set beside the estimate the check makes from the collection's documents
alone (500 pseudo-queries over its first 3,000 documents, no queries, no labels). One point per student x
collection x mode (symmetric; asymmetric: its queries against the teacher-in-frame's documents) x width
(full, 128): `correlation` (Pearson) and `max_error` over all points, written under `label_free` in
docs/results/quality.json, and the distilled pair's figures under `unseen.<collection>.recipe_pair`.

    .venv/bin/python tests/bench/bench_retention.py --run runs/distill

Students: the 3-layer student `rayembed run jobs/distill.yaml` trained (its pair: runs/distill/teacher-in-
frame), and untrained subsets of the teacher's layers (2, 3 and 5 of its 6; no training, the teacher's own
frame, so their asymmetric documents are the teacher's): a spread of retention from poor to close.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import DATA  # noqa: E402

OUT = ROOT / "docs" / "results" / "quality.json"
SUBSETS = {
    "layers_0_5": [0, 5],
    "layers_0_2_5": [0, 2, 5],
    "layers_0_1_2_3_5": [0, 1, 2, 3, 5],
}


def ndcg(q: np.ndarray, d: np.ndarray, beir: tuple[dict, dict, dict], dim: int | None = None) -> float:
    from rayembed.eval.metrics import retrieval_metrics
    from rayembed.model import postprocess

    corpus, queries, qrels = beir
    q, d = (postprocess(x, dim, "float32", True) for x in (q, d))
    return retrieval_metrics(q, d, list(queries), list(corpus), qrels)["ndcg@10"]


def students(run: Path) -> dict[str, tuple[Any, Any]]:
    """name -> (student, its documents' encoder: the pair's teacher-in-frame, or None for the teacher)."""
    from rayembed.model import Embedder

    out = {"distilled_3_layers": (Embedder.load(run / "model", device="cpu"),
                                  Embedder.load(run / "teacher-in-frame", device="cpu"))}  # fmt: skip
    for name, layers in SUBSETS.items():
        out[f"untrained_{name}"] = (Embedder.load("default", device="cpu").keep_layers(layers), None)
    return out


def collection(name: str, work: Path) -> tuple[dict, dict, dict]:
    from rayembed.data.mix import nli_retrieval
    from rayembed.data.readers import load_beir
    from rayembed.eval.job import subset

    if name == "scifact":
        return load_beir(str(DATA / "scifact"), "test")
    nli_retrieval(DATA / "snli-esnli", work / "snli-test", "test")
    corpus, queries, qrels = load_beir(str(work / "snli-test"), "test")
    corpus, queries = subset(corpus, queries, qrels, 1000, None)  # as bench_quality.py and the eval job do
    return corpus, queries, {q: qrels[q] for q in queries}


def points_for(
    coll: str, beir: tuple[dict, dict, dict], studs: dict[str, Any], teacher: Any
) -> list[dict[str, Any]]:
    from rayembed.eval.retention import retention

    corpus, queries, _ = beir
    docs = list(corpus.values())
    tq, td = teacher.encode(list(queries.values())), teacher.encode(docs)
    bar = ndcg(tq, td, beir)
    out = []
    for name, (student, documents) in studs.items():
        sq, sd = student.encode(list(queries.values())), student.encode(docs)
        dd = documents.encode(docs) if documents is not None else td
        est = retention(docs[:3000], teacher, student, documents or teacher, n=500, dims=[128])
        for dim in (None, 128):
            width = str(dim or student.dim)
            for mode, d in (("symmetric", sd), ("asymmetric", dd)):
                true = ndcg(sq, d, beir, dim) / bar
                out.append({"collection": coll, "student": name, "mode": mode, "width": width, "true": round(true, 4),
                            "estimate": est[width][mode]["estimate"], "teacher_ndcg@10": round(bar, 4)})  # fmt: skip
    return out


def pair_figures(beir_dir: str, run: Path, max_queries: int | None) -> dict[str, Any]:
    """The distilled pair as docs/results/quality.json's `unseen` asks: full-width retention symmetric and
    asymmetric, 128-d over full and int8 over float32 (of the pair's asymmetric scores)."""
    from rayembed.eval.config import EvalConfig
    from rayembed.eval.job import evaluate

    settings: dict[str, Any] = {"beir_dir": beir_dir, "sts_file": None, "max_queries": max_queries, "dims": [128],
                                "precisions": ["float32", "int8"]}  # fmt: skip
    teacher = evaluate(EvalConfig(model="default", **settings))["beir"]
    pair = evaluate(
        EvalConfig(model=str(run / "model"), document_model=str(run / "teacher-in-frame"), **settings)
    )
    full = next(k for k in teacher if k.isdigit() and k != "128")
    s, a, t = pair["beir"], pair["beir_pair"], teacher[full]["ndcg@10"]
    return {"student_vs_teacher": round(s[full]["ndcg@10"] / t, 4), "asym_vs_teacher": round(a[full]["ndcg@10"] / t, 4),
            "dim128_vs_full": round(a["128"]["ndcg@10"] / a[full]["ndcg@10"], 4),
            "int8_vs_float32": round(a[f"{full}-int8"]["ndcg@10"] / a[full]["ndcg@10"], 4),
            "teacher_ndcg@10": round(t, 4), "student_ndcg@10": round(s[full]["ndcg@10"], 4),
            "pair_ndcg@10": round(a[full]["ndcg@10"], 4)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="runs/distill", help="a jobs/distill.yaml output_dir")
    a = p.parse_args()
    from rayembed.model import Embedder

    run = Path(a.run).resolve()
    work = Path(tempfile.gettempdir()) / "bench-retention"
    work.mkdir(exist_ok=True)
    teacher, studs = Embedder.load("default", device="cpu"), students(run)
    started, points, pairs = time.perf_counter(), [], {}
    for coll in ("scifact", "snli"):
        beir = collection(coll, work)
        points += points_for(coll, beir, studs, teacher)
        beir_dir, most = (
            (str(DATA / "scifact"), None) if coll == "scifact" else (str(work / "snli-test"), 1000)
        )
        pairs[coll] = pair_figures(beir_dir, run, most) | {
            "label_free": {m: next(x["estimate"] for x in points if x["collection"] == coll and x["student"] == "distilled_3_layers"
                                   and x["mode"] == m and x["width"] == "384") for m in ("symmetric", "asymmetric")}}  # fmt: skip
    true, est = np.array([x["true"] for x in points]), np.array([x["estimate"] for x in points])
    result = json.loads(OUT.read_text())
    for coll, figures in pairs.items():
        result["unseen"][coll]["recipe_pair"] = figures | {
            "student": "jobs/distill.yaml as shipped (3 layers, 250 steps)"
        }
        result["unseen"][coll]["asym_vs_teacher"] = figures["asym_vs_teacher"]
    result["label_free"] = {
        "what": "estimate = student's nDCG@10 / teacher's on 500 pseudo-queries cut from the collection's first 3,000 "
        "documents (eval/retention.py), no queries or labels; true = the same ratio from the collection's qrels",
        "correlation": round(float(np.corrcoef(true, est)[0, 1]), 4), "max_error": round(float(np.abs(true - est).max()), 4),
        "mean_abs_error": round(float(np.abs(true - est).mean()), 4), "points": points,
        "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv), "seconds": round(time.perf_counter() - started),
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, this project's 2-core 24 GiB CPU VM (no GPU)",
    }  # fmt: skip
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            {k: v for k, v in result["label_free"].items() if k != "points"} | {"pairs": pairs}, indent=1
        )
    )


if __name__ == "__main__":
    main()
