"""The `prepare` job: training JSONL from the public sets (SNLI triples, BEIR query/positive pairs, the
general-domain distillation mix), an NLI retrieval collection (a BEIR folder), or a random-weight model of a real family (a CPU stand-in for a recipe's LLM backbone, no weights needed)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from typing import Any

from rayembed.data.config import PrepareConfig
from rayembed.data.mix import general_texts, nli_retrieval
from rayembed.data.readers import load_beir, snli_triples, wiki_articles, write_jsonl
from rayembed.io import join, publish


def prepare_job(cfg: PrepareConfig) -> dict[str, Any]:
    """Run a prepare section; returns what it wrote."""
    if cfg.kind == "random_model":
        from rayembed.model.random_models import build_random_model

        family, size, pooling = cfg.family, cfg.size, cfg.pooling
        assert family is not None
        out = publish(
            lambda p: build_random_model(family, p, size, pooling=pooling), cfg.output, cfg.s3_endpoint_url
        )
        return {"output": out, "family": family, "size": size}
    assert cfg.source is not None
    url = cfg.s3_endpoint_url
    if cfg.kind == "nli_retrieval":
        return {"output": cfg.output, **nli_retrieval(cfg.source, cfg.output, cfg.split, url)}
    if cfg.kind == "articles":
        articles = wiki_articles(join(cfg.source, "wikitext-2", "paragraphs.jsonl"), url)
        return {
            "output": cfg.output,
            "rows": write_jsonl(cfg.output, itertools.islice(articles, cfg.limit), url),
        }
    if cfg.kind == "general":
        rows = general_texts(cfg.source, cfg.sentences, cfg.seed, cfg.corpus, cfg.corpus_rows, url)[
            : cfg.limit
        ]
        # what went in, per source (duplicates and empty texts did not)
        sources = dict(Counter(r["source"] for r in rows))
        return {"output": cfg.output, "rows": write_jsonl(cfg.output, rows, url), "sources": sources}
    rows_written = prepare(cfg.kind, cfg.source, cfg.output, cfg.split, cfg.limit, url)
    return {"output": cfg.output, "rows": rows_written}


def prepare(
    kind: str,
    source: str,
    output: str,
    split: str = "dev",
    limit: int | None = None,
    endpoint_url: str | None = None,
) -> int:
    """Write a training JSONL: kind 'snli' (query/positive/negative) or 'beir' (query/positive from qrels);
    every row also gets an `id` (its line number) so `rayembed embed` can run over the file. Paths may be
    s3:// URIs."""
    if kind == "snli":
        rows: Iterable[dict[str, str]] = snli_triples(source, split, endpoint_url)
    elif kind == "beir":
        corpus, queries, qrels = load_beir(source, split, endpoint_url)
        rows = (
            {"query": queries[q], "positive": corpus[d]}
            for q, docs in qrels.items()
            for d in docs
            if d in corpus
        )
    else:
        raise ValueError(f"unknown prepare kind {kind!r}: use one of the prepare kinds")
    numbered = ({"id": str(i), **r} for i, r in enumerate(itertools.islice(rows, limit)))
    return write_jsonl(output, numbered, endpoint_url)
