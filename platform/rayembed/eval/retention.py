"""A label-free retention check: how much of its teacher's retrieval quality a distilled student keeps on
*this* corpus, from the corpus's documents alone (and, if the user has some, real queries without labels).

Pseudo-queries are cut from the documents (inverse cloze: a contiguous span of a document's words becomes
the query and leaves the document, which stays its one relevant document), so the task is retrieval on the
corpus's own text and vocabulary. The teacher, the student alone (symmetric) and the student's queries
against the teacher-in-frame's documents (asymmetric, the index-compatible pair) each rank the sampled
corpus for them; the estimate of retention is the student's nDCG@10 over the teacher's. Real queries, when
given, add the agreement of the student's top 10 with the teacher's (nDCG@10 of the student's ranking with
the teacher's top 10 as the relevant set: 1.0 when they rank alike). tests/bench/bench_retention.py checks
on labelled collections how closely the estimate tracks the true nDCG@10 retention
(docs/results/quality.json, `label_free`).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from rayembed.eval.metrics import retrieval_metrics
from rayembed.model import Embedder, postprocess

MIN_WORDS = 6  # a document shorter than this gives no pseudo-query (a span and a rest of 3 words each)
# Below this median length (words) of the searched documents the estimate is marked unreliable: on SNLI-test's
# captions (median 7 words) it missed the true retention by up to 0.78, on SciFact's abstracts (~200) by at
# most 0.15 (docs/results/quality.json `label_free`); the bound between is not measured.
RELIABLE_MEDIAN_WORDS = 30


def pseudo_queries(
    docs: list[str], n: int, seed: int = 0
) -> tuple[list[str], list[str], dict[str, dict[str, int]]]:
    """(queries, corpus, qrels): up to `n` documents of at least MIN_WORDS words each give a query, a
    contiguous span of 30-50 % of their words (at most 16), cut out of the document in the corpus. Ids
    are the documents' positions."""
    rng = random.Random(seed)
    corpus = list(docs)
    eligible = [i for i, d in enumerate(docs) if len(d.split()) >= MIN_WORDS]
    queries, qrels = [], {}
    for i in sorted(rng.sample(eligible, min(n, len(eligible)))):
        words = docs[i].split()
        size = min(16, max(3, round(len(words) * rng.uniform(0.3, 0.5))))
        start = rng.randrange(0, len(words) - size + 1)
        queries.append(" ".join(words[start : start + size]))
        corpus[i] = " ".join(words[:start] + words[start + size :])
        qrels[str(len(queries) - 1)] = {str(i): 1}
    return queries, corpus, qrels


def top_k(q: np.ndarray, d: np.ndarray, k: int = 10) -> dict[str, dict[str, int]]:
    """Each query's k best documents by (q, d), as qrels: the reference that `agreement` scores against."""
    top = np.argsort(-(q @ d.T), axis=1)[:, :k]
    return {str(i): {str(j): 1 for j in row} for i, row in enumerate(top)}


def agreement(q: np.ndarray, d: np.ndarray, reference: dict[str, dict[str, int]]) -> float:
    """nDCG@10 of the ranking by (q, d) with the reference ranking's top documents as the relevant ones."""
    return retrieval_metrics(q, d, list(reference), [str(j) for j in range(len(d))], reference)["ndcg@10"]


def retention(
    docs: list[str],
    teacher: Embedder,
    student: Embedder,
    documents: Embedder | None = None,
    real_queries: list[str] | None = None,
    n: int = 500,
    dims: list[int] | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The estimate at full width and each of `dims`: the student's nDCG@10 on pseudo-queries cut from
    `docs`, symmetric and (with the pair's `documents` encoder) asymmetric, over the teacher's at full
    width (the bar is the teacher as it is, whatever width the student is cut to)."""
    queries, corpus, qrels = pseudo_queries(docs, n)
    if not queries:
        raise ValueError(f"no document of the corpus has {MIN_WORDS} words or more: no pseudo-query to cut")
    qids, dids = list(qrels), [str(i) for i in range(len(corpus))]

    def enc(model: Embedder, texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=batch_size)

    t_q, t_d, s_q, s_d = (
        enc(teacher, queries),
        enc(teacher, corpus),
        enc(student, queries),
        enc(student, corpus),
    )
    d_d = None if documents is None else t_d if documents is teacher else enc(documents, corpus)
    modes = {"symmetric": (s_q, s_d)} | ({"asymmetric": (s_q, d_d)} if d_d is not None else {})
    # real queries: the teacher's top 10 (ranked once) and the student's query vectors
    real = (top_k(enc(teacher, real_queries), t_d), enc(student, real_queries)) if real_queries else None
    base = retrieval_metrics(t_q, t_d, qids, dids, qrels)["ndcg@10"]
    words = int(np.median([len(d.split()) for d in docs]))
    out: dict[str, Any] = {"pseudo_queries": len(queries), "docs": len(corpus),
                           "real_queries": len(real_queries or []), "teacher_ndcg@10": round(base, 4),
                           "median_doc_words": words, "reliable": words >= RELIABLE_MEDIAN_WORDS}  # fmt: skip
    if not out["reliable"]:
        out["why_unreliable"] = (
            f"documents are short (median {words} words < {RELIABLE_MEDIAN_WORDS}): a span cut from them "
            "leaves too little to find; the estimate missed by up to 0.78 on 7-word captions"
        )
    for dim in [None, *(dims or [])]:
        width: dict[str, Any] = {}
        for mode, (q, d) in modes.items():
            q, d = (postprocess(x, dim, "float32", True) for x in (q, d))  # unit-length prefixes
            got = retrieval_metrics(q, d, qids, dids, qrels)["ndcg@10"]
            width[mode] = {"ndcg@10": round(got, 4), "estimate": round(got / base, 4) if base else None}
            if real is not None:
                s_real = postprocess(real[1], dim, "float32", True)
                width[mode]["real_query_agreement"] = round(agreement(s_real, d, real[0]), 4)
        out[str(dim or student.dim)] = width
    return out
