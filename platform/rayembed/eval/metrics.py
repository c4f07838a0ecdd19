"""Retrieval and similarity metrics on finished vectors: nDCG@k, Recall@k by exact search, and the
float form of int8/binary codes to score them with."""

from __future__ import annotations

import numpy as np


def ndcg_at_k(ranked: list[str], rels: dict[str, int], k: int = 10) -> float:
    dcg = sum(rels.get(d, 0) / np.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(rels.values(), reverse=True)[:k]
    idcg = sum(r / np.log2(i + 2) for i, r in enumerate(ideal))
    return float(dcg / idcg) if idcg > 0 else 0.0


def recall_at_k(ranked: list[str], rels: dict[str, int], k: int = 100) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant & set(ranked[:k])) / len(relevant) if relevant else 0.0


def retrieval_metrics(
    q_emb: np.ndarray, d_emb: np.ndarray, qids: list[str], dids: list[str], qrels: dict[str, dict[str, int]]
) -> dict[str, float]:
    """Exact dot-product search (embeddings are unit length) and the mean metrics."""
    scores = q_emb @ d_emb.T
    k = min(100, len(dids))
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    ndcg, recall = [], []
    for i, qid in enumerate(qids):
        order = top[i][np.argsort(-scores[i, top[i]], kind="stable")]
        ranked = [dids[j] for j in order]
        ndcg.append(ndcg_at_k(ranked, qrels[qid]))
        recall.append(recall_at_k(ranked, qrels[qid]))
    return {"ndcg@10": float(np.mean(ndcg)), "recall@100": float(np.mean(recall))}


def comparable(x: np.ndarray, precision: str) -> np.ndarray:
    """Float vectors to score with a dot product: int8 codes as they are, binary bits as +-1 (so the dot
    product ranks like Hamming distance); rows are re-normalised so STS can take cosines."""
    v = (
        np.unpackbits(x, axis=-1).astype(np.float32) * 2 - 1
        if precision == "binary"
        else x.astype(np.float32)
    )
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
