"""Contrastive training groups: a query (with its instruction), its positive and `k` negatives per row,
from named columns or FlagEmbedding's format, and what each query may be scored against.

Towers are [queries, positives, negatives slot 0, ..., slot k-1], one text per row each, so GradCache
chunks them row-wise. Gathered across workers, the candidates of every query are all positives, then
slot 0's negatives of every row, slot 1's, ...; `candidate_mask` keeps a row without in-batch negatives
to its own group and drops unused slots of every row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from rayembed.data.flagembedding import Groups, sample_groups
from rayembed.model.batching import Text
from rayembed.train.config import TrainConfig
from rayembed.train.dist import gather_with_grad


def texts_of(column: Any) -> list[str]:
    return [str(t) for t in column]


def groups_of(cfg: TrainConfig, batch: dict[str, Any], rng: np.random.Generator) -> Groups:
    """The batch's groups: sampled FlagEmbedding-style, or read from the query/positive/negative columns
    (a negative column of lists gives k negatives per row)."""
    if cfg.data_format == "flagembedding":
        return sample_groups(batch, cfg.group_size - 1, rng)
    queries, rows = texts_of(batch[cfg.query_column]), len(batch[cfg.query_column])
    negatives: list[list[str]] = []
    if cfg.negative_column:
        column = list(batch[cfg.negative_column])
        if column and not isinstance(column[0], str) and hasattr(column[0], "__len__"):
            k = {len(x) for x in column}
            if len(k) != 1:
                raise ValueError(
                    f"{cfg.negative_column}: every row needs the same number of negatives, got {sorted(k)}"
                )
            negatives = [[str(x[j]) for x in column] for j in range(k.pop())]
        else:
            negatives = [texts_of(column)]
    tasks = batch[cfg.instruction_column] if cfg.instruction_column else [None] * rows
    return Groups(
        queries=queries,
        instructions=[t if isinstance(t, str) and t.strip() else None for t in tasks],
        positives=texts_of(batch[cfg.positive_column]),
        negatives=negatives,
        valid=np.full(rows, len(negatives)),
        in_batch=np.ones(rows, dtype=bool),
        scores=np.full((rows, 1 + len(negatives)), np.nan),
    )


def query_tower(cfg: TrainConfig, queries: list[str], instructions: list[str | None]) -> list[Text]:
    """Queries with their task instruction as a prompt (the row's, else query_instruction), as
    (prompt, text) pairs so pooling can leave the prompt out; plain strings without one."""
    out: list[Text] = []
    for q, task in zip(queries, instructions, strict=True):
        task = task or cfg.query_instruction
        out.append((cfg.instruction_template.format(task=task), q) if task else q)
    return out


def candidate_mask(groups: Groups, offset: int, device: torch.device) -> Tensor | None:
    """[B, N * (1 + k)] booleans: which gathered candidates each local query may be scored against, or
    None when every query may see every candidate (all rows in-batch, every slot used)."""
    k, rows = len(groups.negatives), len(groups.queries)
    valid = gather_with_grad(torch.as_tensor(groups.valid, dtype=torch.float32, device=device))[0]
    if groups.in_batch.all() and bool((valid == k).all()):
        return None
    n = valid.shape[0]
    slots = torch.arange(k, device=device)[:, None] < valid[None, :]  # [k, N]: slot j of global row g used
    seen = torch.cat([torch.ones(n, dtype=torch.bool, device=device), slots.reshape(-1)])
    own = torch.zeros(rows, n * (1 + k), dtype=torch.bool, device=device)
    local = torch.arange(rows, device=device)
    for j in range(1 + k):  # the row's own positive (j = 0) and its own negative slots
        own[local, j * n + offset + local] = True
    in_batch = torch.as_tensor(groups.in_batch, device=device)[:, None]
    return seen[None, :] & (in_batch | own)


def group_valid(groups: Groups, device: torch.device) -> Tensor:
    """[B, 1 + k] booleans: the positive and the used negative slots of each local row."""
    k = len(groups.negatives)
    slots = torch.arange(k, device=device)[None, :] < torch.as_tensor(groups.valid, device=device)[:, None]
    return torch.cat([torch.ones(len(groups.queries), 1, dtype=torch.bool, device=device), slots], dim=1)
