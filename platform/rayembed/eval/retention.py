"""A label-free retention check: how much of its teacher's retrieval quality a distilled student keeps on
*this* corpus, from the corpus's documents alone (and, if the user has some, real queries without labels).

Two kinds of pseudo-query, each measured against the true nDCG@10 retention on labelled collections
(tests/bench/bench_retention.py, docs/results/quality.json `label_free`), each good where the other fails:

- **cloze** (long documents): a contiguous span of a document's words becomes the query and leaves the
  document, which stays its one relevant document (inverse cloze). The teacher, the student alone
  (symmetric) and the student's queries against the pair's documents (asymmetric) rank the corpus; the
  estimate is the student's nDCG@10 over the teacher's. Tracks on abstracts; on 7-word captions a span
  leaves too little to find and the ratios are noise.
- **neighbours** (short documents): a document is the query and searches the others; its relevant
  documents are the teacher's top 3 (silver labels), and the estimate is the student's nDCG@10 against
  them (the teacher scores 1.0). Tracks on captions; on abstracts a whole abstract as query is far from
  any real query and it reads low.

`estimate` is the kind chosen by the documents' median length (`CLOZE_MIN_WORDS`); both are reported. Real
queries, when given, add `real_query_agreement`: the student's nDCG@10 against the teacher's top 3 for
them, the neighbours measure on the user's own queries.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from rayembed.eval.metrics import retrieval_metrics
from rayembed.model import Embedder, postprocess

MIN_WORDS = 6  # a document shorter than this gives no cloze query (a span and a rest of 3 words each)
SILVER = 3  # the teacher's top documents that count as relevant to a neighbours (or real) query
# The median document length (words) from which `estimate` is the cloze one, below it the neighbours one.
# Measured (docs/benchmarks.md "Label-free retention"): cloze tracks on SciFact's abstracts (~200 words) and on
# them cut to 16 or 32 words, and fails on SNLI's captions (7) and on abstracts cut to 8; neighbours ranks
# students rightly everywhere and reads the level right on captions, ~0.2 low on cut abstracts.
CLOZE_MIN_WORDS = 12


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


def ranked(q: np.ndarray, d: np.ndarray, skip: np.ndarray | None = None, k: int = 10) -> np.ndarray:
    """Each query's k best documents by (q, d), best first; `skip[i]` (a document index) is never one."""
    scores, k = q @ d.T, min(k, len(d) - (skip is not None))
    if skip is not None:
        scores[np.arange(len(q)), skip] = -np.inf
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)


def agreement(got: np.ndarray, silver: np.ndarray) -> float:
    """Mean nDCG@10 of rankings `got` (queries x 10 document indices) with each row of `silver` (the
    teacher's top documents) as the relevant set: 1.0 when the student finds what the teacher ranks first."""
    discount = 1 / np.log2(np.arange(2, got.shape[1] + 2))
    hits = (got[:, :, None] == silver[:, None, :]).any(-1)
    return float(((hits * discount).sum(1) / discount[: silver.shape[1]].sum()).mean())


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
    """The estimate at full width and each of `dims`, symmetric and (with the pair's `documents` encoder)
    asymmetric, by both kinds of pseudo-query; the bar is the teacher at full width, whatever width the
    student is cut to."""
    queries, cut, qrels = pseudo_queries(docs, n)
    if not queries:
        raise ValueError(f"no document of the corpus has {MIN_WORDS} words or more: no pseudo-query to cut")
    qids, dids = list(qrels), [str(i) for i in range(len(cut))]
    changed = [int(d) for r in qrels.values() for d in r]  # the documents a cloze query was cut from
    picks = np.array(sorted(random.Random(1).sample(range(len(docs)), min(n, len(docs)))))

    def enc(model: Embedder, texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=batch_size)

    def corpora(model: Embedder) -> tuple[np.ndarray, np.ndarray]:
        """The model's vectors of the cut corpus and of the whole one (only the cut documents twice)."""
        whole = enc(model, docs)
        cloze = whole.copy()
        cloze[changed] = enc(model, [cut[i] for i in changed])
        return cloze, whole

    (t_c, t_d), (s_c, s_d), s_q = corpora(teacher), corpora(student), enc(student, queries)
    sides = {"symmetric": (s_c, s_d)}  # each mode's document vectors: the cut corpus, the whole one
    if documents is not None:
        sides["asymmetric"] = (t_c, t_d) if documents is teacher else corpora(documents)
    base = retrieval_metrics(enc(teacher, queries), t_c, qids, dids, qrels)["ndcg@10"]
    silver = ranked(t_d[picks], t_d, picks, SILVER)
    real = (
        (ranked(enc(teacher, real_queries), t_d, None, SILVER), enc(student, real_queries))
        if real_queries
        else None
    )
    words = int(np.median([len(d.split()) for d in docs]))
    method = "cloze" if words >= CLOZE_MIN_WORDS else "neighbours"
    out: dict[str, Any] = {"method": method, "median_doc_words": words, "docs": len(docs),
                           "pseudo_queries": len(queries), "neighbour_queries": len(picks),
                           "real_queries": len(real_queries or []), "teacher_ndcg@10": round(base, 4)}  # fmt: skip
    for dim in [None, *(dims or [])]:
        width: dict[str, Any] = {}
        for mode, (c, d) in sides.items():
            q, c, d, own = (
                postprocess(x, dim, "float32", True) for x in (s_q, c, d, s_d[picks])
            )  # unit prefixes
            got = {"cloze": round(retrieval_metrics(q, c, qids, dids, qrels)["ndcg@10"] / base, 4) if base else None,
                   "neighbours": round(agreement(ranked(own, d, picks), silver), 4)}  # fmt: skip
            width[mode] = {"estimate": got[method], **got}
            if real is not None:
                q = postprocess(real[1], dim, "float32", True)
                width[mode]["real_query_agreement"] = round(agreement(ranked(q, d), real[0]), 4)
        out[str(dim or student.dim)] = width
    return out
