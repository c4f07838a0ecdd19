"""Long texts as passages: chunk plans from the model's own tokenizer, and chunk vectors, plain or late.

A plan cuts a text into chunks of at most `size` tokens of the model's tokenizer (the text tokenized once,
with character offsets), ending each chunk at the last paragraph or sentence start inside its budget
(`boundary`), else at the last word start, else where the budget ends; consecutive chunks share `overlap`
tokens. Every chunk is a span of the original text: `text[start:end]`.

- `chunks` (plain): each chunk's text is embedded alone by `Embedder.encode`, exactly as if a user had
  passed it.
- `late` (late chunking, Günther et al. 2024, arXiv 2409.04701): the whole text is run through the model
  in windows of up to its max length, and each chunk's vector is the mean of its own tokens' states, so a
  chunk sees the text around it. Mean-pooling models only. A text longer than one window is cut into
  windows that do not overlap; a chunk across two windows pools its tokens from both.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rayembed.model.batching import Tokens, length_batches, pad_batch, validate_texts
from rayembed.model.vectors import postprocess, unit

MODES = ("chunks", "late")
BOUNDARIES = {  # where a unit starts (a chunk prefers to end just before one)
    "paragraph": re.compile(r"\n[ \t]*\n\s*"),
    "sentence": re.compile(r"\n[ \t]*\n\s*|(?<=[.!?])[\"')\]]*\s+"),
    "token": None,
}


@dataclass
class Plan:
    """The chunks of a list of texts, flat: per chunk, its text's index, its index within that text, its
    character span and its token span in the text's tokens (special tokens left out)."""

    doc: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    start: list[int] = field(default_factory=list)
    end: list[int] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    """Each text's token ids (no special tokens)."""
    prompt_name: str | None = None
    pieces: Tokens | None = None
    """`chunks` mode: the tokens of each chunk's own text, as `Embedder.encode` takes them."""

    @property
    def tokens(self) -> list[int]:
        """Each chunk's tokens in its text's tokens (no special tokens)."""
        return [e - s for s, e in self.spans]


def window(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts (before, after) a text's own tokens."""
    inner = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    at = next(i for i in range(len(full) - len(inner) + 1) if full[i : i + len(inner)] == inner)
    return full[:at], full[at + len(inner) :]


def frame(embedder: Any, prompt_name: str | None) -> tuple[list[int], list[int]]:
    """The tokens around a chunk's own in a model call: (special tokens and the prompt's, special tokens)."""
    before, after = window(embedder.tokenizer)
    prompt = embedder.prompt(prompt_name)
    return before + (
        embedder.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    ), after


def budget(embedder: Any, prompt_name: str | None) -> int:
    """Most tokens of a chunk that fit the model's window with its special tokens and prompt."""
    head, after = frame(embedder, prompt_name)
    return int(embedder.max_length) - len(head) - len(after)


def cut(
    offsets: Sequence[tuple[int, int]], text: str, size: int, overlap: int, boundary: str
) -> list[tuple[int, int]]:
    """Token spans [s, e) of at most `size` tokens covering all `offsets` (one text's tokens)."""
    n = len(offsets)
    starts = [o[0] for o in offsets]
    pattern = BOUNDARIES[boundary]
    units = (
        sorted({bisect.bisect_left(starts, m.end()) for m in pattern.finditer(text)} - {0, n})
        if pattern
        else []
    )
    words = [i for i in range(1, n) if offsets[i][0] > offsets[i - 1][1]]  # a gap before: a word starts
    spans: list[tuple[int, int]] = []
    s = 0
    while True:
        e = min(s + size, n)
        if e < n:  # end at the last unit start, else word start, in the budget's second half
            lo = s + max(1, size // 2)
            e = _last_in(units, lo, e) or _last_in(words, lo, e) or e
        spans.append((s, e))
        if e >= n:
            return spans
        nxt = max(e - overlap, s + 1)
        s = (_first_in(words, nxt, e) or nxt) if overlap else e  # an overlap starts at a word too


def _last_in(xs: list[int], lo: int, hi: int) -> int | None:
    """The largest x in xs with lo < x <= hi."""
    i = bisect.bisect_right(xs, hi) - 1
    return xs[i] if i >= 0 and xs[i] > lo else None


def _first_in(xs: list[int], lo: int, hi: int) -> int | None:
    """The smallest x in xs with lo <= x < hi."""
    i = bisect.bisect_left(xs, lo)
    return xs[i] if i < len(xs) and xs[i] < hi else None


def plan(
    tokenizer: Any, texts: Sequence[str], size: int, overlap: int = 0, boundary: str = "sentence"
) -> Plan:
    """Chunks of every text (at least one each, whatever its length), from one tokenizer pass."""
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {sorted(BOUNDARIES)}, got {boundary!r}")
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"chunk size must be >= 1 and overlap in [0, size), got {size} and {overlap}")
    texts = validate_texts(texts)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    out = Plan(ids=list(enc["input_ids"]))
    for d, (text, offsets) in enumerate(zip(texts, enc["offset_mapping"], strict=True)):
        # nothing the tokenizer keeps (e.g. control characters): the text as it is, one chunk
        spans = cut(offsets, text, size, overlap, boundary) if offsets else [(0, 0)]
        out.doc += [d] * len(spans)
        out.index += range(len(spans))
        out.spans += spans
        out.start += [offsets[s][0] if offsets else 0 for s, _ in spans]
        out.end += [offsets[e - 1][1] if offsets else len(text) for _, e in spans]
    return out


def late(
    embedder: Any, p: Plan, prompt_name: str | None, batch_size: int, max_tokens: int | None,
    stats: dict[str, int] | None = None,
) -> np.ndarray:  # fmt: skip
    """Pooled (not yet normalised) vectors of the plan's chunks by late chunking: [chunks, dim]."""
    if embedder.pooling != "mean" or embedder.latent is not None:
        raise ValueError(
            f"late chunking pools each chunk's token states by their mean; this model pools by {embedder.pooling}"
        )
    head, after = frame(embedder, prompt_name)
    width = int(embedder.max_length) - len(head) - len(after)
    windows, where = [], []  # token ids per window; (text, first token) per window
    for d, ids in enumerate(p.ids):
        for w in range(0, max(len(ids), 1), width):
            windows.append(head + ids[w : w + width] + after)
            where.append((d, w))
    sums = np.zeros((len(p.doc), embedder.hidden_size), dtype=np.float64)
    counts = np.array([e - s for s, e in p.spans], dtype=np.float64)
    chunks_of: dict[int, list[int]] = {}
    for k, d in enumerate(p.doc):
        chunks_of.setdefault(d, []).append(k)
    for i, states in token_states(embedder, windows, batch_size, max_tokens, stats):
        d, w = where[i]
        own = states[len(head) : len(head) + width]
        total = np.concatenate([np.zeros((1, own.shape[1])), np.cumsum(own, 0)])
        n = len(own)
        for k in chunks_of[d]:
            s, e = p.spans[k]
            if s == e:  # a text without tokens of its own: its window's states, as plain pooling does
                sums[k], counts[k] = states.sum(0), len(states)
            else:
                sums[k] += total[min(max(e - w, 0), n)] - total[min(max(s - w, 0), n)]
    pooled = torch.from_numpy((sums / counts[:, None]).astype(np.float32))
    if embedder.projection is not None:  # as Embedder._pool applies it
        with torch.inference_mode():
            weight = embedder.projection.weight
            pooled = embedder.projection(pooled.to(weight.device, weight.dtype)).float().cpu()
    return pooled.numpy()


@torch.inference_mode()
def token_states(
    embedder: Any, windows: list[list[int]], batch_size: int, max_tokens: int | None,
    stats: dict[str, int] | None = None,
) -> Any:  # fmt: skip
    """(window index, its last hidden states [len, hidden] float32) for each window, length-batched."""
    pad_id = embedder.tokenizer.pad_token_id or 0
    was_training = embedder.training
    embedder.eval()
    for idx in length_batches([len(x) for x in windows], batch_size, max_tokens):
        input_ids, mask = pad_batch([windows[i] for i in idx], pad_id)
        out = embedder.states(input_ids.to(embedder.device), mask.to(embedder.device))
        hidden = out.last_hidden_state.float().cpu().numpy()
        if stats is not None:
            stats["tokens"] = stats.get("tokens", 0) + int(mask.sum())
            stats["padded_tokens"] = stats.get("padded_tokens", 0) + mask.numel()
        for row, i in enumerate(idx):
            yield int(i), hidden[row, : len(windows[i])].astype(np.float64)
    embedder.train(was_training)


def prepare(
    embedder: Any, texts: Sequence[str], mode: str = "chunks", size: int | None = None, overlap: int = 0,
    boundary: str = "sentence", prompt_name: str | None = None,
) -> Plan:  # fmt: skip
    """The CPU half of `encode_chunks`: the plan and, for `chunks`, each chunk's tokens. `size` defaults
    to the most tokens a chunk can have in the model's window (its special tokens and prompt aside)."""
    if mode not in MODES:
        raise ValueError(f"chunking mode must be one of {MODES}, got {mode!r}")
    fits = budget(embedder, prompt_name)
    size = size or fits
    if size > fits:
        raise ValueError(f"chunks of {size} tokens do not fit the model's window: {fits} at most "
                         f"(max_length {embedder.max_length}, less its special tokens and prompt)")  # fmt: skip
    texts = validate_texts(texts)
    p = plan(embedder.tokenizer, texts, size, overlap, boundary)
    p.prompt_name = prompt_name
    if mode == "chunks":
        pieces = [texts[d][s:e] or texts[d] for d, s, e in zip(p.doc, p.start, p.end, strict=True)]
        p.pieces = embedder.tokenize_ids(pieces, prompt_name)
    return p


def encode_chunks(
    embedder: Any, texts: Sequence[str] | Plan, mode: str = "chunks", size: int | None = None,
    overlap: int = 0, boundary: str = "sentence", dim: int | None = None, precision: str = "float32",
    batch_size: int = 64, max_tokens: int | None = None, stats: dict[str, int] | None = None,
    prompt_name: str | None = None,
) -> tuple[Plan, np.ndarray, list[bool]]:  # fmt: skip
    """(the chunk plan, one vector per chunk, which chunks the model cut at its max length): what the
    batch job and the endpoint call for chunked output. `texts` may be a `prepare`d plan (made ahead, on
    another thread); `chunks` vectors are `Embedder.encode`'s of each chunk's text."""
    p = (
        texts
        if isinstance(texts, Plan)
        else prepare(embedder, texts, mode, size, overlap, boundary, prompt_name)
    )
    if p.pieces is not None:
        vectors = embedder.encode(p.pieces, dim, precision, batch_size, max_tokens, stats)
        return p, vectors, list(p.pieces.truncated)
    if not embedder.normalize and precision != "float32":
        raise ValueError(f"precision {precision} quantises unit vectors: it needs a normalising model")
    pooled = late(embedder, p, p.prompt_name, batch_size, max_tokens, stats)
    vectors = postprocess(
        unit(pooled) if embedder.normalize else pooled,
        dim,
        precision,
        embedder.normalize,
        embedder.int8_scales,
    )
    return p, vectors, [False] * len(p.doc)
