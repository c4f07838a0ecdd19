"""The eval job: nDCG@10 and Recall@100 on a BEIR set, Spearman on STS Benchmark, at every Matryoshka
width and output precision, via `Embedder.encode` and `postprocess` (what the batch job writes)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from rayembed.data.readers import load_beir, load_sts
from rayembed.eval.config import EvalConfig
from rayembed.eval.metrics import comparable, retrieval_metrics
from rayembed.io import open_file
from rayembed.model import Embedder, postprocess, resolve_model_path
from rayembed.model.layout import trained_in
from rayembed.tracking import log_job


def subset(
    corpus: dict[str, str],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    max_queries: int | None,
    max_docs: int | None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Keep the first `max_queries` queries, their judged docs, and distractors up to `max_docs`."""
    qids = sorted(queries)[:max_queries] if max_queries else sorted(queries)
    judged = {d for q in qids for d in qrels[q] if d in corpus}
    docs = sorted(judged)
    if max_docs:
        docs += [d for d in sorted(corpus) if d not in judged][: max(0, max_docs - len(docs))]
    else:
        docs = sorted(corpus)
    return {d: corpus[d] for d in docs}, {q: queries[q] for q in qids}


def beir_scores(
    cfg: EvalConfig, model: Embedder, q: np.ndarray, encoder: Embedder, d: np.ndarray, qids: list[str],
    dids: list[str], qrels: dict[str, dict[str, int]],
) -> dict[str, Any]:  # fmt: skip
    """`model`'s query vectors `q` against `encoder`'s document vectors `d` (`model` itself, or a pair's
    document encoder), at each width and precision (each side quantised with its own int8 scales)."""
    out: dict[str, Any] = {"queries": len(qids), "docs": len(dids)}
    for key, dim, prec in variants(cfg, model.dim):
        qv = comparable(postprocess(q, dim, prec, True, model.int8_scales), prec)
        dv = comparable(postprocess(d, dim, prec, True, encoder.int8_scales), prec)
        out[key] = retrieval_metrics(qv, dv, qids, dids, qrels)
    return out


def beir_reports(
    cfg: EvalConfig, model: Embedder, documents: Embedder | None, name: str, corpus: dict[str, str],
    queries: dict[str, str], qrels: dict[str, dict[str, int]],
) -> dict[str, Any]:  # fmt: skip
    """`beir`: the model alone. With a pair's `documents` encoder (the teacher in the student's frame) also
    `beir_pair` (the model's queries against its documents), `beir_documents` (the documents encoder
    alone: at full width, the teacher's own figures) and `beir_retention` (full-width nDCG@10 of the
    model alone and of the pair as shares of the teacher's, the labelled counterpart of the label-free
    check). The documents are embedded once per encoder."""
    qids, dids, texts = list(queries), list(corpus), list(corpus.values())

    def encode(m: Embedder, rows: list[str], prompt: str | None) -> np.ndarray:
        return m.encode(rows, batch_size=cfg.batch_size, prompt_name=prompt)

    q = encode(model, list(queries.values()), cfg.query_prompt_name)
    d = encode(model, texts, cfg.document_prompt_name)
    out = {"beir": {"set": name} | beir_scores(cfg, model, q, model, d, qids, dids, qrels)}
    if documents is None:
        return out
    named = {"set": name, "documents": documents.name}
    d = encode(documents, texts, cfg.document_prompt_name)
    out["beir_pair"] = named | beir_scores(cfg, model, q, documents, d, qids, dids, qrels)
    # the teacher's queries: its own prompt of that name, if it has one
    own = cfg.query_prompt_name if cfg.query_prompt_name in documents.prompts else None
    t = encode(documents, list(queries.values()), own)
    out["beir_documents"] = named | beir_scores(cfg, documents, t, documents, d, qids, dids, qrels)
    full = str(model.dim)
    teacher = out["beir_documents"][full]["ndcg@10"]
    out["beir_retention"] = {"width": model.dim, "teacher_ndcg@10": teacher} | {
        key: out[part][full]["ndcg@10"] / teacher if teacher else float("nan")
        for key, part in (("student_vs_teacher", "beir"), ("asym_vs_teacher", "beir_pair"))
    }
    return out


def corpus_retention(cfg: EvalConfig, model: Embedder, documents: Embedder | None) -> dict[str, Any]:
    """The label-free retention check of `model` (and its pair) against `cfg.teacher` on `cfg.corpus`."""
    from rayembed.data.mix import corpus_texts
    from rayembed.eval.retention import retention

    url = cfg.s3_endpoint_url
    docs = corpus_texts(str(cfg.corpus), cfg.corpus_docs, url)
    real = corpus_texts(cfg.corpus_queries, 100_000, url) if cfg.corpus_queries else None
    teacher = Embedder.load(resolve_model_path(str(cfg.teacher), url), device=str(model.device))
    return retention(docs, teacher, model, documents, real, cfg.pseudo_queries, cfg.dims, cfg.batch_size)


def variants(cfg: EvalConfig, full: int) -> list[tuple[str, int | None, str]]:
    """(report key, dim, precision) for each width x precision; float32 keys are the bare width."""
    out = []
    for dim in [None, *cfg.dims]:
        for precision in cfg.precisions:
            width = str(dim or full)
            out.append((width if precision == "float32" else f"{width}-{precision}", dim, precision))
    return out


def sts_sample(
    s1: list[str], s2: list[str], gold: list[float], max_pairs: int | None
) -> tuple[list[str], list[str], list[float]]:
    """At most `max_pairs` of the pairs, evenly spaced from the first to the last (all if None)."""
    if max_pairs is None or max_pairs >= len(gold):
        return s1, s2, gold
    keep = np.linspace(0, len(gold) - 1, max_pairs).round().astype(int)
    return [s1[i] for i in keep], [s2[i] for i in keep], [gold[i] for i in keep]


def evaluate(
    cfg: EvalConfig, model: Embedder | None = None, documents: Embedder | None = None
) -> dict[str, Any]:
    """Metrics at full width and each of `cfg.dims` (and, with a pair's `documents` encoder, its queries
    against those documents); written to `cfg.output` if set."""
    url = cfg.s3_endpoint_url
    path = None
    if model is None:
        path = resolve_model_path(cfg.model, url)
        model = Embedder.load(path)
    if documents is None and cfg.document_model:
        documents = Embedder.load(resolve_model_path(cfg.document_model, url), device=str(model.device))
    if documents is not None and (model.frame is None or documents.frame != model.frame):
        raise ValueError(f"document_model records frame {documents.frame}, model {model.frame}: not one pair")
    report: dict[str, Any] = {"model": model.name}
    if cfg.beir_dir:
        corpus, queries, qrels = load_beir(cfg.beir_dir, cfg.split, url)
        corpus, queries = subset(corpus, queries, qrels, cfg.max_queries, cfg.max_docs)
        name = cfg.beir_dir.rstrip("/").rsplit("/", 1)[-1]
        report |= beir_reports(cfg, model, documents, name, corpus, queries, qrels)
    if cfg.corpus:
        report["retention"] = corpus_retention(cfg, model, documents)
    if cfg.sts_file:
        s1, s2, gold = sts_sample(*load_sts(cfg.sts_file, url), cfg.max_pairs)
        a, b = (
            model.encode(s, batch_size=cfg.batch_size, prompt_name=cfg.document_prompt_name) for s in (s1, s2)
        )
        report["sts"] = {"pairs": len(gold)}
        for key, dim, prec in variants(cfg, model.dim):
            a2, b2 = (comparable(postprocess(x, dim, prec, True, model.int8_scales), prec) for x in (a, b))
            cos = (a2 * b2).sum(-1)
            report["sts"][key] = {"spearman": float(spearmanr(cos, gold).statistic)}
    if cfg.output:
        with open_file(cfg.output, "w", url) as f:
            f.write(json.dumps(report, indent=2) + "\n")
    if cfg.tracking:
        made_by = trained_in(path) if path is not None else {}
        report["tracking"] = log_job(
            cfg.tracking, "eval", dataclasses.asdict(cfg), report, cfg.model, made_by
        )
    return report
