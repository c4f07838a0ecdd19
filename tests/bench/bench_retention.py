"""Does the label-free retention check (eval/retention.py) track the true retention? On the labelled
collections no training text came from (SciFact test: 300 queries over their judged abstracts and
distractors to 2,000, whole and cut to their first 16 and 8 words; SNLI-test as retrieval: 1,000 premises
over every hypothesis), each student's true nDCG@10 retention (its nDCG@10 over the teacher's, from the
qrels) is set beside the estimates the check makes from the collection's documents alone (its first 2,000,
no queries, no labels): `cloze` (500 spans cut from documents), `neighbours` (500 documents as queries,
the teacher's top 3 as relevant) and `estimate`, the one of the two the check reports for the documents'
median length; and `real_query_agreement`, what the check gives when the user also has real queries without
labels (the collection's queries, their labels unused: the student's nDCG@10 against the teacher's top 3). One point per student x collection x mode (symmetric; asymmetric: its queries against the
teacher-in-frame's documents) x width (full, 128): `correlation` (Pearson) and `max_error` over all points,
written under `label_free` in docs/results/quality.json, and the distilled pair's figures under
`unseen.<collection>.recipe_pair`.

    .venv/bin/python tests/bench/bench_retention.py --run runs/distill

Students: the 3-layer student `rayembed run jobs/distill.yaml` trained (its pair: runs/distill/teacher-in-
frame), and untrained subsets of the teacher's layers (2, 3 and 5 of its 6; no training, the teacher's own
frame, so their asymmetric documents are the teacher's): a spread of retention from poor to close.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from results import header  # noqa: E402

from conftest import DATA  # noqa: E402
from rayembed.eval.retention import CLOZE_MIN_WORDS  # noqa: E402

OUT = ROOT / "docs" / "results" / "quality.json"
ESTIMATE_DOCS = 2000  # the estimate's corpus: the collection's first documents, no queries, no labels
COLLECTIONS = ("scifact", "scifact_16w", "scifact_8w", "snli")
KINDS = ("estimate", "cloze", "neighbours", "real_query_agreement")
SUBSETS = {
    "layers_0_5": [0, 5],
    "layers_0_2_5": [0, 2, 5],
    "layers_0_1_2_3_5": [0, 1, 2, 3, 5],
}


class Cached:
    """An Embedder whose vectors are kept per text: the estimate's pseudo-corpus differs from the collection
    only in the documents a query was cut from, so only those (and the queries) are encoded again."""

    def __init__(self, model: Any) -> None:
        self.model, self.seen = model, dict[str, np.ndarray]()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def encode(self, texts: list[str], **kwargs: Any) -> np.ndarray:
        new = list(dict.fromkeys(t for t in texts if t not in self.seen))
        if new:
            self.seen.update(zip(new, self.model.encode(new, **kwargs), strict=True))
        return np.stack([self.seen[t] for t in texts])


def score(q: np.ndarray, d: np.ndarray, beir: tuple[dict, dict, dict], dim: int | None = None,
          precision: str = "float32", scales: tuple[Any, Any] = (None, None)) -> float:  # fmt: skip
    from rayembed.eval.metrics import comparable, retrieval_metrics
    from rayembed.model import postprocess

    corpus, queries, qrels = beir
    q, d = (
        comparable(postprocess(x, dim, precision, True, s), precision)
        for x, s in zip((q, d), scales, strict=True)
    )
    return retrieval_metrics(q, d, list(queries), list(corpus), qrels)["ndcg@10"]


def students(run: Path) -> dict[str, tuple[Any, Any]]:
    """name -> (student, its documents' encoder: the pair's teacher-in-frame, or None for the teacher)."""
    from rayembed.model import Embedder

    out: dict[str, tuple[Any, Any]] = {"distilled_3_layers": (Cached(Embedder.load(run / "model", device="cpu")),
                                  Cached(Embedder.load(run / "teacher-in-frame", device="cpu")))}  # fmt: skip
    for name, layers in SUBSETS.items():
        out[f"untrained_{name}"] = (Cached(Embedder.load("default", device="cpu").keep_layers(layers)), None)
    return out


def collection(name: str, work: Path) -> tuple[dict, dict, dict]:
    """SciFact test: its 300 queries over their judged abstracts and distractors to 2,000 (a third of the
    encoding of all 5,183), whole or each cut to its first N words (`scifact_<N>w`: the same labels on short
    documents); SNLI-test: its first 1,000 premises over every hypothesis (as bench_quality.py and the eval
    job cut it)."""
    from rayembed.data.mix import nli_retrieval
    from rayembed.data.readers import load_beir
    from rayembed.eval.job import subset

    if name.startswith("scifact"):
        corpus, queries, qrels = load_beir(str(DATA / "scifact"), "test")
        corpus, queries = subset(corpus, queries, qrels, None, 2000)
        if name != "scifact":
            words = int(name.removeprefix("scifact_").removesuffix("w"))
            corpus = {d: " ".join(text.split()[:words]) for d, text in corpus.items()}
    else:
        nli_retrieval(DATA / "snli-esnli", work / "snli-test", "test")
        corpus, queries, qrels = load_beir(str(work / "snli-test"), "test")
        corpus, queries = subset(corpus, queries, qrels, 1000, None)
    return corpus, queries, {q: qrels[q] for q in queries}


def scifact_dev() -> tuple[dict, dict, dict]:
    """SciFact's train queries that have judgements (809: a dev collection, the recipe sweep chose settings
    on them) over all 5,183 abstracts."""
    from rayembed.data.readers import load_beir

    corpus, queries, qrels = load_beir(str(DATA / "scifact"), "train")
    return corpus, {q: t for q, t in queries.items() if q in qrels}, qrels


def points_for(
    coll: str, beir: tuple[dict, dict, dict], studs: dict[str, Any], teacher: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The points of every student x mode x width, and the distilled pair's `unseen` figures."""
    from rayembed.eval.retention import retention

    corpus, queries, _ = beir
    docs = list(corpus.values())
    tq, td = teacher.encode(list(queries.values())), teacher.encode(docs)
    bar = score(tq, td, beir)
    out, pair = [], {}
    for name, (student, documents) in studs.items():
        sq, sd = student.encode(list(queries.values())), student.encode(docs)
        dd = documents.encode(docs) if documents is not None else td
        real = list(queries.values())  # the collection's queries as a user's sample: their labels unused
        est = retention(docs[:ESTIMATE_DOCS], teacher, student, documents or teacher, real, n=500, dims=[128])
        for dim in (None, 128):
            width = str(dim or student.dim)
            for mode, d in (("symmetric", sd), ("asymmetric", dd)):
                true = score(sq, d, beir, dim) / bar
                out.append({"collection": coll, "student": name, "mode": mode, "width": width, "true": round(true, 4),
                            **est[width][mode], "method": est["method"], "median_doc_words": est["median_doc_words"],
                            "teacher_ndcg@10": round(bar, 4)})  # fmt: skip
        if documents is not None:
            scales = (student.int8_scales, documents.int8_scales)
            full, sym = score(sq, dd, beir), score(sq, sd, beir)
            pair = {"student_vs_teacher": round(sym / bar, 4), "asym_vs_teacher": round(full / bar, 4),
                    "dim128_vs_full": round(score(sq, dd, beir, 128) / full, 4),
                    "int8_vs_float32": round(score(sq, dd, beir, None, "int8", scales) / full, 4),
                    "teacher_ndcg@10": round(bar, 4), "student_ndcg@10": round(sym, 4), "pair_ndcg@10": round(full, 4),
                    "label_free_estimate": {m: est[str(student.dim)][m]["estimate"] for m in ("symmetric", "asymmetric")},
                    "queries": len(queries), "docs": len(docs)}  # fmt: skip
    return out, pair


def agreement(points: list[dict[str, Any]], kind: str = "estimate") -> dict[str, float]:
    """How the estimates (`kind`: the reported one, `cloze` or `neighbours`) follow the true retention:
    Pearson correlation, largest and mean absolute error, the mean signed error (bias: estimate - true) and
    the largest overshoot (estimate - true: a student said to keep more than it does)."""
    true, est = np.array([x["true"] for x in points]), np.array([x[kind] for x in points])
    return {"correlation": round(float(np.corrcoef(true, est)[0, 1]), 4), "max_error": round(float(np.abs(true - est).max()), 4),
            "mean_abs_error": round(float(np.abs(true - est).mean()), 4), "bias": round(float((est - true).mean()), 4), "max_overshoot": round(float((est - true).max()), 4),
            "points": len(points)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="runs/distill", help="a jobs/distill.yaml output_dir")
    a = p.parse_args()
    from rayembed.model import Embedder

    run = Path(a.run).resolve()
    work = Path(tempfile.gettempdir()) / "bench-retention"
    work.mkdir(exist_ok=True)
    teacher, studs = Cached(Embedder.load("default", device="cpu")), students(run)
    started, points, pairs = time.perf_counter(), [], {}
    for coll in COLLECTIONS:
        got, pair = points_for(coll, collection(coll, work), studs, teacher)
        points += got
        if coll in ("scifact", "snli"):
            pairs[coll] = pair
        print(coll, json.dumps(agreement(got)), flush=True)
    result = json.loads(OUT.read_text())
    for coll, figures in pairs.items():
        result["unseen"][coll]["recipe_pair"] = figures | {
            "student": "jobs/distill.yaml as shipped (3 layers, 250 steps) and its teacher-in-frame"
        }
    result["label_free"] = {
        "what": "estimate = eval/retention.py's `estimate` from the collection's first 2,000 documents alone (no "
        "queries, no labels): `cloze` (student's nDCG@10 / teacher's on 500 spans cut from documents) where their "
        f"median length is >= {CLOZE_MIN_WORDS} words, else `neighbours` (student's nDCG@10 on 500 documents as "
        "queries with the teacher's top 3 as relevant); true = the student's nDCG@10 / teacher's from the qrels",
        **agreement(points), "by_kind": {k: agreement(points, k) for k in KINDS[1:]},
        "by": {f"{c} {m}": {k: agreement([x for x in points if x["collection"] == c and x["mode"] == m], k)
                            for k in KINDS}
               for c in COLLECTIONS for m in ("symmetric", "asymmetric")},
        "points": points, **header(), "seconds": round(time.perf_counter() - started),
    }  # fmt: skip
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {k: v for k, v in result["label_free"].items() if k != "points"} | {"pairs": pairs}, indent=1
        )
    )


if __name__ == "__main__":
    main()
