"""Long texts as passages (model/chunking.py): chunk plans from the model's own tokenizer, plain chunk
vectors equal to `Embedder.encode` of each chunk's text, late-chunked vectors equal to pooling the text's
token states over each chunk's span."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import DATA
from rayembed.model import Embedder
from rayembed.model import chunking as C


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Embedder:
    return Embedder.load(tiny_model, device="cpu")  # max_length 64: 62 tokens of text a window


@pytest.fixture(scope="module")
def articles() -> list[str]:
    """Long documents: runs of 8 consecutive Wikipedia paragraphs (wikitext-2), ~1,000 tokens each."""
    rows = [json.loads(x) for x in (DATA / "wikitext-2" / "paragraphs.jsonl").read_text().splitlines()[:96]]
    return ["\n\n".join(r["text"] for r in rows[i : i + 8]) for i in range(0, 96, 8)]


def test_a_plan_covers_each_text_in_spans_within_budget_ending_at_sentences(
    model: Embedder, articles: list[str]
) -> None:
    tok = model.tokenizer
    p = C.plan(tok, articles, size=48, overlap=0, boundary="sentence")
    assert sorted(set(p.doc)) == list(range(len(articles)))
    ends_at_sentence = 0
    for d, text in enumerate(articles):
        ks = [k for k, x in enumerate(p.doc) if x == d]
        assert [p.index[k] for k in ks] == list(range(len(ks))) and len(ks) >= 5
        spans = [p.spans[k] for k in ks]
        assert spans[0][0] == 0 and spans[-1][1] == len(p.ids[d])  # every token, in order, once
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        for k in ks:
            piece = text[p.start[k] : p.end[k]]
            assert 1 <= p.tokens[k] <= 48
            # the span's own tokens are the tokens of text[start:end]
            assert tok(piece, add_special_tokens=False)["input_ids"] == p.ids[d][slice(*p.spans[k])]
            ends_at_sentence += piece.endswith((".", "!", "?", '"'))
    assert ends_at_sentence > 0.6 * len(p.doc)  # 75 % here
    tokens = C.plan(tok, articles, size=48, boundary="token")
    ends = sum(articles[d][:e].endswith((".", "!", "?")) for d, e in zip(tokens.doc, tokens.end, strict=True))
    assert ends < 0.2 * len(tokens.doc)  # 9 % here: the budget's end is mid-sentence nearly always


def test_overlap_short_texts_and_bad_settings(model: Embedder, articles: list[str]) -> None:
    tok = model.tokenizer
    p = C.plan(tok, articles[:1], size=40, overlap=10, boundary="token")
    shared = [a[1] - b[0] for a, b in zip(p.spans, p.spans[1:], strict=False)]
    assert all(8 <= s <= 10 for s in shared)  # an overlap starts at a word: at most a word less
    short = C.plan(tok, ["A short text.", "  padded  "], size=40)
    assert short.doc == [0, 1] and short.index == [0, 0]
    assert ["A short text.", "  padded  "][1][short.start[1] : short.end[1]] == "padded"
    with pytest.raises(ValueError, match="overlap in \\[0, size\\)"):
        C.plan(tok, ["x"], size=10, overlap=10)
    with pytest.raises(ValueError, match="input 1 is empty"):
        C.plan(tok, ["x", " "], size=10)
    with pytest.raises(ValueError, match="do not fit the model's window: 62 at most"):
        C.prepare(model, ["x"], size=63)


def test_plain_chunks_are_encode_of_each_chunks_text(model: Embedder, articles: list[str]) -> None:
    p, vectors, cut = C.encode_chunks(model, articles[:3], "chunks", size=40, overlap=8)
    pieces = [articles[d][s:e] for d, s, e in zip(p.doc, p.start, p.end, strict=True)]
    np.testing.assert_array_equal(vectors, model.encode(pieces))
    assert not any(cut) and vectors.shape == (len(pieces), model.dim)
    _, codes, _ = C.encode_chunks(model, articles[:3], "chunks", size=40, overlap=8, dim=16, precision="int8")
    np.testing.assert_array_equal(codes, model.encode(pieces, dim=16, precision="int8"))


def _states(model: Embedder, ids: list[int]) -> torch.Tensor:
    """The backbone's last hidden states of one window: [CLS] ids [SEP], by hand."""
    window = [model.tokenizer.cls_token_id, *ids, model.tokenizer.sep_token_id]
    with torch.no_grad():
        out = model.backbone(input_ids=torch.tensor([window]), attention_mask=torch.ones(1, len(window)))
    return out.last_hidden_state[0, 1:-1].double()


def test_late_chunks_pool_the_texts_token_states_over_each_span(model: Embedder, articles: list[str]) -> None:
    text = articles[0][:250]  # fits one window (62 tokens of text)
    p, vectors, _ = C.encode_chunks(model, [text], "late", size=12, boundary="token")
    assert len(p.doc) >= 3 and len(p.ids[0]) <= 62
    states = _states(model, p.ids[0])
    want = np.stack([states[s:e].mean(0).numpy() for s, e in p.spans])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, want, atol=1e-5)
    # a late chunk sees its context; a plain one does not
    _, plain, _ = C.encode_chunks(model, [text], "chunks", size=12, boundary="token")
    assert np.abs(plain - vectors).max() > 1e-2

    # A text longer than one window: windows of 62 tokens side by side, a chunk across two pools both.
    long = articles[1]
    p, vectors, _ = C.encode_chunks(model, [long], "late", size=40, boundary="token", batch_size=3)
    ids = p.ids[0]
    states = torch.cat([_states(model, ids[w : w + 62]) for w in range(0, len(ids), 62)])
    want = np.stack([states[s:e].mean(0).numpy() for s, e in p.spans])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert any(s // 62 != (e - 1) // 62 for s, e in p.spans)
    np.testing.assert_allclose(vectors, want, atol=1e-5)


def test_late_chunking_is_refused_for_a_model_that_does_not_mean_pool(model: Embedder) -> None:
    model.set_pooling("cls")
    try:
        with pytest.raises(ValueError, match="late chunking pools each chunk's token states by their mean"):
            C.encode_chunks(model, ["some text"], "late")
    finally:
        model.set_pooling("mean")


def test_a_long_context_model_embeds_a_20k_token_document_whole_within_the_token_budget(
    tiny_decoder: Any, tiny_model: Path
) -> None:
    """A decoder with 32k positions reads a 20k-token document whole (no chunking, nothing cut); the
    token budget gives it a model call of its own while 8 short texts share one: no call holds more than
    max(budget, the longest text) tokens, not the longest text times the batch."""
    model = Embedder.load(tiny_decoder("qwen3", size="tiny-long", max_length=32768), device="cpu")
    paragraphs = [
        json.loads(x)["text"] for x in (DATA / "wikitext-2" / "paragraphs.jsonl").read_text().splitlines()
    ]
    long = "\n\n".join(paragraphs[:80])
    n = len(model.tokenize_ids([long]).ids[0])
    assert 20000 < n < 32768 and model.tokenize_ids([long]).truncated == [False]
    calls: list[tuple[int, int]] = []
    hook = model.backbone.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        texts = [paragraphs[81], long, *paragraphs[82:89]]
        vectors = model.encode(texts, batch_size=64, max_tokens=4096)
    finally:
        hook.remove()
    assert calls[0] == (1, n) and max(b * t for b, t in calls[1:]) <= 4096 and sum(b for b, _ in calls) == 9
    np.testing.assert_allclose(vectors[1], model.encode([long])[0], atol=1e-5)
    # the bundled-style default would have cut it; a BERT cannot go past its positions
    assert Embedder.load(tiny_model, device="cpu").set_max_length(128).max_length == 128
    with pytest.raises(ValueError, match="max_length must be in 1..128"):
        Embedder.load(tiny_model, device="cpu").set_max_length(4096)
