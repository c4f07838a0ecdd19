"""FlagEmbedding's fine-tuning format, read as its users have it.

Rows: `query`, `pos` (list), `neg` (list), and optionally `prompt` (the query's task instruction), `type`
(normal, only_1neg, symmetric_class, symmetric_sts, symmetric_clustering, ...), `pos_scores` /
`neg_scores` (a teacher's scores, e.g. a reranker's). Files of one folder may lack some of these.
Like FlagEmbedding, each query trains with a group of one sampled positive and `group_size - 1` sampled
negatives (repeated when a row has fewer; one for only_1neg rows; at most the row's own for
symmetric_class rows), and data in a folder (or file) whose name ends in `no_in_batch_neg` trains
without in-batch negatives: its queries see only their own group. Rows of both kinds may share a batch
here, as the loss masks per row (FlagEmbedding keeps them in separate batches instead).
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

TYPES = {
    "query": pa.string(), "pos": pa.list_(pa.string()), "neg": pa.list_(pa.string()), "prompt": pa.string(),
    "type": pa.string(), "pos_scores": pa.list_(pa.float64()), "neg_scores": pa.list_(pa.float64()),
    "path": pa.string(),
}  # fmt: skip
COLUMNS = list(TYPES)
NO_IN_BATCH = "no_in_batch_neg"


def normalize(table: pa.Table) -> pa.Table:
    """One block of a FlagEmbedding folder with every column of the format (absent ones as nulls), so
    blocks of files with and without prompts or scores stream alike (Ray Data `map_batches`)."""
    for needed in ("query", "pos", "neg"):
        if needed not in table.column_names:
            where = (
                table.column("path")[0].as_py() if "path" in table.column_names and len(table) else "input"
            )
            raise ValueError(
                f"{where}: FlagEmbedding rows need query, pos and neg; it has {table.column_names}"
            )
    columns = {
        c: table.column(c).cast(t) if c in table.column_names else pa.nulls(len(table), t)
        for c, t in TYPES.items()
    }
    return pa.table(columns)


def in_batch_allowed(path: str | None) -> bool:
    """False for data under a folder, or in a file, whose name ends in no_in_batch_neg."""
    parts = (path or "").split("/")
    return not any(posixpath.splitext(p)[0].endswith(NO_IN_BATCH) for p in parts)


@dataclass
class Groups:
    """One batch as training groups: per row a query (and its instruction), a positive, `k` negative
    slots (the first `valid` hold real samples), whether in-batch negatives count, and teacher scores
    of [positive, negatives...] (NaN where the row has none)."""

    queries: list[str]
    instructions: list[str | None]
    positives: list[str]
    negatives: list[list[str]]  # k towers of one text per row
    valid: np.ndarray  # [B] ints
    in_batch: np.ndarray  # [B] bools
    scores: np.ndarray  # [B, 1 + k] floats


def _group_size(kind: str | None, negatives: int, k: int) -> int:
    if kind == "only_1neg":
        return min(1, k)
    if kind == "symmetric_class":
        return min(negatives, k)
    return k


def _sample_row(
    row: dict[str, Any], k: int, rng: np.random.Generator
) -> tuple[str, list[str], int, list[float]]:
    """(positive, k negative slots, how many are real, teacher scores) of one row, FlagEmbedding's way."""
    pos, neg = (
        list(row["pos"] if row["pos"] is not None else []),
        list(row["neg"] if row["neg"] is not None else []),
    )
    if not pos:
        raise ValueError(
            f"{row.get('path') or 'input'}: a row has no positive (query {str(row['query'])[:60]!r})"
        )
    p = int(rng.integers(len(pos)))
    n = _group_size(row.get("type"), len(neg), k) if neg else 0
    if len(neg) >= n:
        idx = rng.choice(len(neg), n, replace=False) if n else np.zeros(0, dtype=int)
    else:  # fewer negatives than the group needs: each repeated, then sampled (FlagEmbedding)
        idx = rng.permutation(np.tile(np.arange(len(neg)), math.ceil(n / len(neg))))[:n]
    slots = [neg[i] for i in idx] + [pos[p]] * (k - n)  # unused slots are masked out of the loss
    scores = [math.nan] * (1 + k)
    ps, ns = row.get("pos_scores"), row.get("neg_scores")
    if ps is not None and ns is not None and len(ps) == len(pos) and len(ns) == len(neg):
        scores[: 1 + n] = [float(ps[p])] + [float(ns[i]) for i in idx]
    return pos[p], slots, n, scores


def sample_groups(batch: dict[str, Any], k: int, rng: np.random.Generator) -> Groups:
    """Groups of a batch of normalized rows (columns as numpy arrays); `k` = group_size - 1."""
    rows = [{c: batch[c][i] for c in COLUMNS} for i in range(len(batch["query"]))]
    sampled = [_sample_row(r, k, rng) for r in rows]
    return Groups(
        queries=[str(r["query"]) for r in rows],
        instructions=[
            r["prompt"] if isinstance(r["prompt"], str) and r["prompt"].strip() else None for r in rows
        ],
        positives=[s[0] for s in sampled],
        negatives=[[s[1][j] for s in sampled] for j in range(k)],
        valid=np.array([s[2] for s in sampled], dtype=np.int64),
        in_batch=np.array([in_batch_allowed(r["path"]) for r in rows], dtype=bool),
        scores=np.array([s[3] for s in sampled], dtype=np.float64).reshape(len(rows), 1 + k),
    )
