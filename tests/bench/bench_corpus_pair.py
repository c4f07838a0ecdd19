"""A finished distillation run's student and its pair, scored on the two labelled collections: SNLI-test as
retrieval (its first 1,000 premises over all 9,639 hypotheses, bench_retention.py's cut) and SciFact test
(all 300 queries over all 5,183 abstracts). Per collection: the student alone and the pair (the student's
queries against the teacher-in-frame's documents) as shares of the teacher's nDCG@10, each one's 128-d prefix
against its full width (and the teacher-in-frame's own, on both sides), and int8 against float32 (the models'
calibrated scales). The figures go under `--key` in docs/results/distill-corpus.json with the date, machine
and command; what else that entry records is kept.

    .venv/bin/python tests/bench/bench_corpus_pair.py --run runs/distill --key snli_captions_run_4_layers_500_steps

Which collection's text the run trained on is the run's to say (`--what`): with `prepare.corpus=` a
collection's documents are training text and its queries are not. The teacher's SciFact nDCG@10 is read from
docs/results/quality.json (`unseen.scifact.teacher_ndcg@10`: the same model on the same collection) rather than
encoding its 5,183 abstracts again; SNLI-test's is the teacher-in-frame's at full width, measured here (the
teacher turned by the run's rotation ranks exactly as the teacher does: tests/test_pair.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "bench"))
from bench_retention import collection, scifact_dev, score  # noqa: E402
from results import header  # noqa: E402

from conftest import DATA  # noqa: E402

OUT = ROOT / "docs" / "results" / "distill-corpus.json"


def figures(
    student: Any, documents: Any, beir: tuple[dict, dict, dict], teacher_ndcg: float | None
) -> dict[str, Any]:
    """The student alone and the pair against the teacher, at full width, 128-d and int8 (`teacher_ndcg`
    None: the teacher-in-frame's at full width, which ranks as the teacher does)."""
    corpus, queries, _ = beir
    start = time.time()
    qs, docs = list(queries.values()), list(corpus.values())
    sq, sd, dd = student.encode(qs), student.encode(docs), documents.encode(docs)
    sym, pair = score(sq, sd, beir), score(sq, dd, beir)
    own, both = (student.int8_scales,) * 2, (student.int8_scales, documents.int8_scales)
    tq = documents.encode(qs)  # the teacher in frame on both sides: what the frame's own prefix keeps
    teacher_ndcg = score(tq, dd, beir) if teacher_ndcg is None else teacher_ndcg
    return {
        "teacher_ndcg@10": round(teacher_ndcg, 4),
        "student_ndcg@10": round(sym, 4),
        "pair_ndcg@10": round(pair, 4),
        "student_vs_teacher": round(sym / teacher_ndcg, 4),
        "asym_vs_teacher": round(pair / teacher_ndcg, 4),
        "student_dim128_vs_full": round(score(sq, sd, beir, 128) / sym, 4),
        "pair_dim128_vs_full": round(score(sq, dd, beir, 128) / pair, 4),
        "teacher_in_frame_dim128_vs_full": round(score(tq, dd, beir, 128) / score(tq, dd, beir), 4),
        "student_int8_vs_float32": round(score(sq, sd, beir, None, "int8", own) / sym, 4),
        "pair_int8_vs_float32": round(score(sq, dd, beir, None, "int8", both) / pair, 4),
        "queries": len(qs),
        "docs": len(docs),
        "encode_and_score_s": round(time.time() - start),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", type=Path, default=Path("runs/distill"), help="the run's output_dir")
    p.add_argument("--key", required=True, help="the entry's name in the results file")
    p.add_argument("--what", default="", help="what the run trained on, and so which collection is unseen")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--dev", action="store_true", help="SciFact's train queries only (a dev collection)")
    args = p.parse_args()
    if args.dev:
        return dev_check(args)

    from rayembed.data.readers import load_beir
    from rayembed.model import Embedder

    student = Embedder.load(args.run / "model", device="cpu")
    documents = Embedder.load(args.run / "teacher-in-frame", device="cpu")
    with tempfile.TemporaryDirectory() as work:
        snli = collection("snli", Path(work))
    entry: dict[str, Any] = header() | {"what": args.what, "run": str(args.run)}
    entry["snli_test"] = figures(student, documents, snli, None)  # the teacher's: the frame's at full width
    quality = json.loads((ROOT / "docs" / "results" / "quality.json").read_text())
    scifact = load_beir(str(DATA / "scifact"), "test")
    entry["scifact_test"] = figures(
        student, documents, scifact, quality["unseen"]["scifact"]["teacher_ndcg@10"]
    )
    entry["scifact_test"]["teacher_from"] = "docs/results/quality.json unseen.scifact.teacher_ndcg@10"
    save(args, entry, entry)


def save(args: argparse.Namespace, part: dict[str, Any], shown: dict[str, Any]) -> None:
    """`part` merged into the entry `--key` of the results file (what else it records is kept); `shown` printed."""
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.key] = results.get(args.key, {}) | part
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(shown, indent=2))


def dev_check(args: argparse.Namespace) -> None:
    """`--dev`: SciFact's train queries (a dev collection: the recipe sweep chose settings on them) over all
    5,183 abstracts, under `--key` as `scifact_train_dev`. The teacher's score is the teacher-in-frame's at full width: the
    teacher turned by the run's rotation ranks exactly as the teacher does (tests/test_pair.py)."""
    from rayembed.model import Embedder

    student = Embedder.load(args.run / "model", device="cpu")
    documents = Embedder.load(args.run / "teacher-in-frame", device="cpu")
    entry = header() | {"what": args.what} | figures(student, documents, scifact_dev(), None)
    entry["teacher_from"] = "the teacher-in-frame at full width (the teacher rotated: the same ranking)"
    save(args, {"scifact_train_dev": entry}, entry)


if __name__ == "__main__":
    main()
