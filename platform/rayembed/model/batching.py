"""Token ids in, padded batches out: input checks, length-sorted batches cut by a token budget, padding."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# A text, or (prompt, text): an instruction before the text (`Instruct: ...\nQuery: `), which pooling
# leaves out when the model's include_prompt is False (training towers with per-row instructions).
Text = str | tuple[str, str]


@dataclass
class Tokens:
    """Token ids of a list of texts, unpadded; which of them were cut at max_length; and, when pooling
    leaves a prompt out, how many tokens of each row the prompt takes."""

    ids: list[list[int]]
    truncated: list[bool]
    prompt_lengths: list[int] | None = None


def validate_texts(texts: Sequence[Any]) -> list[str]:
    """Return `texts` as a list of non-empty strings or raise ValueError naming the first bad item."""
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, not a single string")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise ValueError(f"input {i} is {type(t).__name__}, expected a string")
        if not t.strip():
            raise ValueError(f"input {i} is empty")
    return out


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token ids to the longest row: (input_ids, attention_mask)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    mask = np.arange(int(lengths.max())) < lengths[:, None]
    input_ids = np.full(mask.shape, pad_id, dtype=np.int64)
    # a boolean-mask assignment fills row by row, left to right: the rows' ids in order
    input_ids[mask] = np.fromiter(
        itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum())
    )
    return torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))


def length_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None
) -> list[np.ndarray]:
    """Indices grouped into batches of similar length: <= batch_size rows and <= max_tokens padded tokens."""
    order = np.argsort(np.asarray(lengths), kind="stable")[::-1].copy()  # longest first: OOM shows up at once
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = lengths[order[start]]
        rows = batch_size if not max_tokens else max(1, min(batch_size, max_tokens // max(longest, 1)))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def split_to(batches: list[np.ndarray], pieces: int) -> list[np.ndarray]:
    """`batches` cut further until there are `pieces` of them: the one with most rows is halved (its rows
    stay length-sorted), so no piece pads more than before. ValueError if there are fewer rows than
    pieces."""
    out = list(batches)
    while len(out) < pieces:
        i = max(range(len(out)), key=lambda j: len(out[j]))
        if len(out[i]) < 2:
            rows = sum(map(len, out))
            raise ValueError(f"cannot cut {rows} rows into {pieces} forward passes")
        half = (len(out[i]) + 1) // 2
        out[i : i + 1] = [out[i][:half], out[i][half:]]
    return out


def length_chunks(
    feats: dict[str, torch.Tensor], max_tokens: int, pieces: Callable[[int], int] | None = None
) -> list[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """A right-padded tokenized batch cut into length-sorted chunks of <= max_tokens padded tokens, each
    trimmed to its own longest row: (row indices, features) per chunk. `pieces(n)`: how many chunks to
    make given this plan's n (>= n; e.g. the most any worker needs, see `by_length`)."""
    lengths = feats["attention_mask"].sum(dim=1).tolist()
    plan = length_batches(lengths, len(lengths), max_tokens)
    if pieces is not None:
        plan = split_to(plan, pieces(len(plan)))
    chunks = []
    for idx in plan:
        rows, longest = torch.from_numpy(idx), max(lengths[i] for i in idx)
        chunks.append((idx, {k: v[rows, :longest] if v.ndim == 2 else v[rows] for k, v in feats.items()}))
    return chunks


def by_length(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    feats: dict[str, torch.Tensor],
    max_tokens: int | None,
    pieces: Callable[[int], int] | None = None,
) -> torch.Tensor:
    """forward(feats) computed chunk by chunk over `length_chunks` and put back in row order: the same
    rows as one padded pass (autograd flows through), with far less padding when lengths are mixed.
    None: one pass.

    The number of passes follows this batch's lengths. Where every worker must run as many passes as the
    others (ZeRO-3 gathers each layer's parameters from all workers in every forward and backward pass),
    `pieces` agrees on a count, e.g. the most any worker's plan needs (train.dist.most): a worker whose
    plan is shorter halves its biggest chunks until it has that many."""
    if not max_tokens:
        return forward(feats)
    chunks = length_chunks(feats, max_tokens, pieces)
    if len(chunks) == 1:
        return forward(feats)  # rows as they are (a chunk's are sorted by length)
    out = torch.cat([forward(part) for _, part in chunks])
    order = torch.as_tensor(np.concatenate([idx for idx, _ in chunks]), device=out.device)
    return out[torch.argsort(order)]
