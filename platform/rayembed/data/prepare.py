"""The `prepare` job: training JSONL from the public sets (SNLI triples, BEIR query/positive pairs, the
general-domain distillation mix), an NLI retrieval collection (a BEIR folder), or a random-weight model of a real family (a CPU stand-in for a recipe's LLM backbone, no weights needed)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rayembed.data.config import PrepareConfig
from rayembed.data.mix import general_texts, nli_retrieval
from rayembed.data.readers import load_beir, snli_triples, wiki_articles, write_jsonl


def prepare_job(cfg: PrepareConfig) -> dict[str, Any]:
    """Run a prepare section; returns what it wrote."""
    if cfg.kind == "random_model":
        from rayembed.model.random_models import build_random_model

        assert cfg.family is not None
        path = build_random_model(cfg.family, cfg.output, cfg.size, pooling=cfg.pooling)
        return {"output": str(path), "family": cfg.family, "size": cfg.size}
    assert cfg.source is not None
    if cfg.kind == "nli_retrieval":
        return {"output": cfg.output, **nli_retrieval(cfg.source, cfg.output, cfg.split)}
    if cfg.kind == "articles":
        articles = wiki_articles(Path(cfg.source) / "wikitext-2" / "paragraphs.jsonl")
        return {"output": cfg.output, "rows": write_jsonl(cfg.output, itertools.islice(articles, cfg.limit))}
    if cfg.kind == "general":
        rows = general_texts(cfg.source, cfg.sentences, cfg.seed, cfg.corpus, cfg.corpus_rows)[: cfg.limit]
        # what went in, per source (duplicates and empty texts did not)
        sources = dict(Counter(r["source"] for r in rows))
        return {"output": cfg.output, "rows": write_jsonl(cfg.output, rows), "sources": sources}
    return {"output": cfg.output, "rows": prepare(cfg.kind, cfg.source, cfg.output, cfg.split, cfg.limit)}


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
        raise ValueError(f"unknown prepare kind {kind!r}: use one of the prepare kinds")
    return write_jsonl(output, ({"id": str(i), **r} for i, r in enumerate(itertools.islice(rows, limit))))
