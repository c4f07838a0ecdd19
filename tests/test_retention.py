"""The label-free retention check (eval/retention.py): cloze queries cut from the corpus (the student's
nDCG@10 on them over the teacher's) and documents as queries against the teacher's neighbours, symmetric
and through the pair, and real queries' agreement."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA
from rayembed.eval.metrics import ndcg_at_k, retrieval_metrics
from rayembed.eval.retention import CLOZE_MIN_WORDS, MIN_WORDS, SILVER, pseudo_queries, retention
from rayembed.model import Embedder
from rayembed.train.config import TrainConfig
from rayembed.train.pair import teacher_in_frame


def _docs(n: int = 300) -> list[str]:
    lines = (DATA / "scifact" / "corpus.jsonl").read_text().splitlines()[:n]
    return [json.loads(x)["text"] for x in lines]


def test_pseudo_queries_are_spans_cut_out_of_their_documents() -> None:
    docs = [*_docs(50), "too short", ""]
    queries, corpus, qrels = pseudo_queries(docs, 20, seed=3)
    assert len(queries) == 20 and len(corpus) == len(docs) and list(qrels) == [str(i) for i in range(20)]
    for qid, query in enumerate(queries):
        [(doc, rel)] = qrels[str(qid)].items()
        original, left = docs[int(doc)].split(), corpus[int(doc)].split()
        span = query.split()
        assert rel == 1 and 3 <= len(span) <= 16 and len(left) == len(original) - len(span)
        start = next(i for i in range(len(original)) if original[i : i + len(span)] == span)
        assert left == original[:start] + original[start + len(span) :]  # cut out, the rest kept in order
    assert corpus[-2:] == ["too short", ""] and all(
        len(docs[int(d)].split()) >= MIN_WORDS for r in qrels.values() for d in r
    )
    assert pseudo_queries(docs, 20, seed=3) == (queries, corpus, qrels)  # seeded
    untouched = set(range(len(docs))) - {int(d) for r in qrels.values() for d in r}
    assert all(corpus[i] == docs[i] for i in untouched)


def test_a_student_equal_to_its_teacher_keeps_all_and_a_weaker_one_is_measured(
    tiny_model: Path, tiny_pair: tuple[Path, Path]
) -> None:
    docs = _docs()
    teacher = Embedder.load(tiny_model, device="cpu")
    rotation = np.linalg.qr(np.random.default_rng(2).normal(size=(32, 32)))[0]
    same = Embedder.load(tiny_model, device="cpu").rotate(rotation)
    cfg = TrainConfig(data="x", output_dir="y", loss="distill", teacher=str(tiny_model), teacher_column="e")
    real = ["what causes inflammation", "gene expression in cancer cells", "vaccine efficacy trials"]
    got = retention(docs, teacher, same, teacher_in_frame(cfg, same, rotation), real_queries=real, n=100)
    assert got["pseudo_queries"] == got["neighbour_queries"] == 100 and got["docs"] == len(docs)
    assert (
        got["real_queries"] == 3 and got["median_doc_words"] >= CLOZE_MIN_WORDS and got["method"] == "cloze"
    )
    for mode in ("symmetric", "asymmetric"):  # the same network, turned: it ranks as the teacher does
        assert got["32"][mode]["estimate"] == got["32"][mode]["cloze"] == pytest.approx(1.0, abs=1e-3)
        assert got["32"][mode]["neighbours"] == pytest.approx(1.0, abs=1e-3)
        assert got["32"][mode]["real_query_agreement"] == pytest.approx(1.0, abs=1e-3)

    student, documents = (Embedder.load(p, device="cpu") for p in tiny_pair)  # the teacher's layer 1 alone
    weak = retention(docs, teacher, student, documents, n=100, dims=[8])
    queries, corpus, qrels = pseudo_queries(docs, 100)
    ids = [str(i) for i in range(len(corpus))]

    def cloze(q: Embedder, d: Embedder) -> float:
        return retrieval_metrics(q.encode(queries), d.encode(corpus), list(qrels), ids, qrels)["ndcg@10"]

    base = cloze(teacher, teacher)
    assert weak["teacher_ndcg@10"] == pytest.approx(base, abs=1e-4)
    assert weak["32"]["symmetric"]["cloze"] == pytest.approx(cloze(student, student) / base, abs=1e-3)
    assert weak["32"]["asymmetric"]["cloze"] == pytest.approx(cloze(student, documents) / base, abs=1e-3)
    assert weak["32"]["symmetric"]["cloze"] != weak["32"]["asymmetric"]["cloze"]
    # neighbours, by hand: each sampled document searches the others; the teacher's top 3 are relevant
    picks = sorted(random.Random(1).sample(range(len(docs)), 100))
    t, s, d = (m.encode(docs) for m in (teacher, student, documents))
    for mode, dv in (("symmetric", s), ("asymmetric", d)):
        gains = []
        for i in picks:
            by_teacher, by_student = t[i] @ t.T, s[i] @ dv.T
            by_teacher[i] = by_student[i] = -np.inf
            silver = {str(j): 1 for j in np.argsort(-by_teacher)[:SILVER]}
            gains.append(ndcg_at_k([str(j) for j in np.argsort(-by_student)[:10]], silver))
        assert weak["32"][mode]["neighbours"] == pytest.approx(np.mean(gains), abs=1e-3)
        assert weak["32"][mode]["neighbours"] < 1.0  # not the teacher: some of its neighbours differ
    assert set(weak) >= {"32", "8"} and weak["8"]["symmetric"]["cloze"] != weak["32"]["symmetric"]["cloze"]
    with pytest.raises(ValueError, match="no pseudo-query to cut"):
        retention(["a few words", "two"], teacher, student)
    captions = retention([" ".join(d.split()[:7]) for d in docs], teacher, student, n=50)  # short documents
    assert captions["method"] == "neighbours" and captions["median_doc_words"] == 7
    assert captions["32"]["symmetric"]["estimate"] == captions["32"]["symmetric"]["neighbours"]


def test_the_eval_job_runs_the_check_on_a_corpus(
    tiny_model: Path, tiny_pair: tuple[Path, Path], scifact_docs: Path
) -> None:
    from rayembed.eval.config import EvalConfig
    from rayembed.eval.job import evaluate

    student_dir, documents_dir = tiny_pair
    cfg = EvalConfig(model=str(student_dir), document_model=str(documents_dir), teacher=str(tiny_model), beir_dir=None,
                     sts_file=None, corpus=str(scifact_docs), corpus_docs=200, pseudo_queries=60)  # fmt: skip
    report = evaluate(cfg)
    student, documents, teacher = (Embedder.load(p, device="cpu") for p in (*tiny_pair, tiny_model))
    rows = [json.loads(x) for x in scifact_docs.read_text().splitlines()[:200]]
    docs = [f"{r['title']} {r['text']}" if r.get("title") else r["text"] for r in rows]
    assert report["retention"] == retention(docs, teacher, student, documents, n=60) and "beir" not in report
    with pytest.raises(ValueError, match="corpus .* needs the teacher"):
        EvalConfig(beir_dir=None, sts_file=None, corpus=str(scifact_docs))
    with pytest.raises(ValueError, match="eval needs beir_dir, sts_file or corpus"):
        EvalConfig(beir_dir=None, sts_file=None)
