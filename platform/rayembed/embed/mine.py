"""Mine job: hard negatives for (query, positive) training pairs, from vectors the batch pipeline made.

1. `rayembed embed` runs three times into <output>/_vectors/{queries,positives,corpus} (resumable and
   exactly-once like any embed job; a changed model is refused there): the pairs' queries (query and
   positive texts passed through), their positives, and the corpus (text passed through).
2. Each query's `top_k` corpus documents by inner product (unit vectors: cosine), by an exact blocked
   scan or a faiss HNSW index.
3. Candidates are dropped if ranked below `skip_top`, if their text is the positive's, or if they score
   above (positive score - `margin`): likely unlabelled positives, i.e. false negatives (NV-Retriever's
   TopK-MarginPos). The first `num_negatives` survivors are kept.
4. <output>/mined.jsonl: one row per (pair, negative) with id, query, positive, negative and the scores;
   pairs with no surviving candidate, or whose query/positive the embed job rejected, go to
   _rejects.jsonl with the reason; counts in _summary.json. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from rayembed.embed.config import EmbedConfig, MineConfig
from rayembed.embed.job import embed
from rayembed.embed.manifest import REJECTS
from rayembed.embed.rows import fs_for
from rayembed.io import strip_scheme


def embed_runs(cfg: MineConfig) -> dict[str, EmbedConfig]:
    """The three embed jobs whose vectors the mining reads."""
    common: dict[str, Any] = {"model": cfg.model, "s3_endpoint_url": cfg.s3_endpoint_url, "progress": False}
    vectors = f"{cfg.output}/_vectors"
    pair_cols: dict[str, Any] = {"input": cfg.pairs, "id_column": cfg.id_column}
    return {
        "queries": EmbedConfig(
            **common, **pair_cols, output=f"{vectors}/queries", text_column=cfg.query_column,
            passthrough_columns=[cfg.query_column, cfg.positive_column],
        ),
        "positives": EmbedConfig(
            **common, **pair_cols, output=f"{vectors}/positives", text_column=cfg.positive_column
        ),
        "corpus": EmbedConfig(
            **common, input=cfg.corpus, output=f"{vectors}/corpus", id_column=cfg.corpus_id_column,
            text_column=cfg.corpus_text_column, title_column=cfg.corpus_title_column,
            passthrough_columns=[c for c in (cfg.corpus_text_column, cfg.corpus_title_column) if c],
        ),
    }  # fmt: skip


def read_vectors(path: str, endpoint_url: str | None) -> tuple[pa.Table, np.ndarray]:
    """An embed output folder as (other columns, float32 [rows, dim] vectors)."""
    table = pads.dataset(
        strip_scheme(path), filesystem=fs_for(path, endpoint_url), format="parquet"
    ).to_table()
    emb = table.column("embedding").combine_chunks()
    vectors = emb.values.to_numpy(zero_copy_only=False).reshape(len(table), emb.type.list_size)
    return table.drop_columns(["embedding"]), np.array(vectors, dtype=np.float32)  # a writable copy for torch


def read_rejects(path: str, endpoint_url: str | None) -> list[dict[str, Any]]:
    """The rows an embed job rejected (id, reason), from its _rejects/ folder."""
    fs, root = fs_for(path, endpoint_url), f"{strip_scheme(path)}/{REJECTS}"
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    return pads.dataset(root, filesystem=fs, format="parquet").to_table().to_pylist()


def search(queries: np.ndarray, docs: np.ndarray, k: int, index: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores, doc rows) of each query's top k by inner product, best first; rows are -1 past the end."""
    k = min(k, len(docs))
    if index == "faiss":
        import faiss

        hnsw = faiss.IndexHNSWFlat(docs.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = max(64, 2 * k)
        hnsw.add(np.ascontiguousarray(docs))
        scores, rows = hnsw.search(np.ascontiguousarray(queries), k)
        return scores, rows
    import torch

    d = torch.from_numpy(docs)
    parts = [
        torch.topk(torch.from_numpy(queries[i : i + 1024]) @ d.T, k) for i in range(0, len(queries), 1024)
    ]
    return torch.cat([p.values for p in parts]).numpy(), torch.cat([p.indices for p in parts]).numpy()


def doc_texts(cfg: MineConfig, corpus: pa.Table) -> list[str]:
    """The corpus texts as embedded ("title text" when there is a title)."""
    texts = corpus.column(cfg.corpus_text_column).to_pylist()
    if not cfg.corpus_title_column:
        return texts
    titles = corpus.column(cfg.corpus_title_column).to_pylist()
    return [f"{h} {t}" if isinstance(h, str) and h.strip() else t for h, t in zip(titles, texts, strict=True)]


def choose(
    cfg: MineConfig, pos_score: float, scores: np.ndarray, rows: np.ndarray, positive: str, docs: list[str]
) -> tuple[list[tuple[int, float]], str | None]:
    """The kept (doc row, score) negatives of one query, or [] and why none survived."""
    ceiling = pos_score - cfg.margin
    kept, above, same = [], 0, 0
    for rank, (score, row) in enumerate(zip(scores, rows, strict=True)):
        if rank < cfg.skip_top or row < 0:
            continue
        if docs[row] == positive:
            same += 1
        elif score > ceiling:
            above += 1
        else:
            kept.append((int(row), float(score)))
            if len(kept) == cfg.num_negatives:
                break
    why = None if kept else f"no candidate in top {cfg.top_k} below positive score - margin ({above} above)"
    return kept, why


def mine(cfg: MineConfig) -> dict[str, Any]:
    """Run the three embed jobs (or resume them), mine, and write mined.jsonl; returns the summary."""
    start = time.time()
    runs = embed_runs(cfg)
    embed_summaries = {name: embed(c) for name, c in runs.items()}
    pairs, q = read_vectors(runs["queries"].output, cfg.s3_endpoint_url)
    pos_ids, p = read_vectors(runs["positives"].output, cfg.s3_endpoint_url)
    corpus, d = read_vectors(runs["corpus"].output, cfg.s3_endpoint_url)
    ids = [str(i) for i in pairs.column("id").to_pylist()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{cfg.pairs}: ids in column {cfg.id_column!r} must be unique to join the vectors")
    pos_row = {str(i): r for r, i in enumerate(pos_ids.column("id").to_pylist())}
    queries, positives = (pairs.column(c).to_pylist() for c in (cfg.query_column, cfg.positive_column))
    docs, doc_ids = doc_texts(cfg, corpus), [str(i) for i in corpus.column("id").to_pylist()]
    scores, rows = search(q, d, cfg.top_k, cfg.index)
    out, reasons = [], Counter[str]()
    rejects = [
        {"id": str(r["id"]), "reason": f"query rejected by the embed job: {r['reason']}"}
        for r in read_rejects(runs["queries"].output, cfg.s3_endpoint_url)
    ]
    reasons.update(r["reason"] for r in rejects)
    query_rejects = len(rejects)
    for i, pid in enumerate(ids):
        if pid not in pos_row:
            why: str | None = "positive rejected by the embed job (see _vectors/positives/_rejects)"
            kept: list[tuple[int, float]] = []
        else:
            pos_score = float(q[i] @ p[pos_row[pid]])
            kept, why = choose(cfg, pos_score, scores[i], rows[i], positives[i], docs)
        for n, (row, score) in enumerate(kept):
            out.append(
                {"id": pid if cfg.num_negatives == 1 else f"{pid}-{n}", "query": queries[i],
                 "positive": positives[i], "negative": docs[row], "negative_id": doc_ids[row],
                 "positive_score": round(pos_score, 6), "negative_score": round(score, 6)}
            )  # fmt: skip
        if why:
            rejects.append({"id": pid, "reason": why})
            reasons[why.split(" (")[0]] += 1
    summary = {
        "output": f"{cfg.output}/mined.jsonl", "pairs": len(ids) + embed_summaries["queries"]["rejected"],
        "rows": len(out), "pairs_with_negatives": len(ids) - (len(rejects) - query_rejects),
        "rejected": len(rejects),
        "rejected_by_reason": dict(reasons), "corpus_docs": len(docs), "index": cfg.index,
        "embed": {k: {x: v[x] for x in ("rows", "rejected", "fragments_skipped")} for k, v in embed_summaries.items()},
        "wall_s": round(time.time() - start, 2),
    }  # fmt: skip
    write_outputs(cfg, out, rejects, summary)
    return summary


def write_outputs(
    cfg: MineConfig, rows: list[dict[str, Any]], rejects: list[dict[str, Any]], summary: Any
) -> None:
    """mined.jsonl (written to a temporary name, then moved), _rejects.jsonl and _summary.json."""
    fs, root = fs_for(cfg.output, cfg.s3_endpoint_url), strip_scheme(cfg.output)
    for name, items in (("_rejects.jsonl", rejects), ("mined.jsonl", rows)):
        with fs.open_output_stream(f"{root}/.{name}.tmp") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items).encode())
        fs.move(f"{root}/.{name}.tmp", f"{root}/{name}")
    with fs.open_output_stream(f"{root}/_summary.json") as f:
        f.write((json.dumps(summary, indent=2) + "\n").encode())
