"""The `prepare` job: training JSONL from the public sets (SNLI triples, BEIR query/positive pairs)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from rayembed.data.readers import load_beir, snli_triples, write_jsonl


def prepare(kind: str, source: str, output: str, split: str = "dev", limit: int | None = None) -> int:
    """Write a training JSONL: kind 'snli' (query/positive/negative) or 'beir' (query/positive from qrels);
    every row also gets an `id` (its line number) so `rayembed embed` can run over the file."""
    if kind == "snli":
        rows: Iterable[dict[str, str]] = snli_triples(source, split)
    elif kind == "beir":
        corpus, queries, qrels = load_beir(source, split)
        rows = (
            {"query": queries[q], "positive": corpus[d]}
            for q, docs in qrels.items()
            for d in docs
            if d in corpus
        )
    else:
        raise ValueError(f"unknown prepare kind {kind!r}: use snli or beir")
    return write_jsonl(output, ({"id": str(i), **r} for i, r in enumerate(itertools.islice(rows, limit))))
