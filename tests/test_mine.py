"""Hard-negative mining on vectors from the embed pipeline: real SciFact text, the bundled MiniLM (a random
model scores every document alike, so margins would mean nothing), exact and faiss search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rayembed.config import MineConfig
from rayembed.data.readers import read_jsonl, write_jsonl
from rayembed.embed.mine import mine
from rayembed.model import Embedder

pytestmark = pytest.mark.usefixtures("ray_local")


def test_mine_hard_negatives(scifact_docs: Path, tmp_path: Path) -> None:
    docs = list(read_jsonl(scifact_docs))[:120]
    write_jsonl(tmp_path / "corpus.jsonl", docs)
    pairs = [{"id": f"p{i}", "query": d["title"], "positive": d["text"]} for i, d in enumerate(docs[:40])]
    pairs += [{"id": "empty-q", "query": " ", "positive": docs[50]["text"]}]
    pairs += [{"id": "empty-p", "query": docs[51]["title"], "positive": ""}]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)

    def run(**kw: object) -> dict:
        settings = dict(pairs=str(tmp_path / "pairs.jsonl"), corpus=str(tmp_path / "corpus.jsonl"),
                        corpus_id_column="_id", top_k=20, margin=0.02, output=str(tmp_path / "mined"))  # fmt: skip
        return mine(MineConfig(**{**settings, **kw}))  # type: ignore[arg-type]

    summary = run()
    rows = list(read_jsonl(tmp_path / "mined" / "mined.jsonl"))
    rejects = {r["id"]: r["reason"] for r in read_jsonl(tmp_path / "mined" / "_rejects.jsonl")}
    assert summary["pairs"] == 42 and summary["rows"] == len(rows)
    assert len(rows) + len(rejects) == 42  # every pair is mined or rejected with a reason
    assert rejects["empty-q"].startswith("query rejected by the embed job")
    assert rejects["empty-p"].startswith("positive rejected by the embed job")
    assert len(rows) >= 20 and json.loads((tmp_path / "mined" / "_summary.json").read_text()) == summary

    # Brute force with the same encode function: the kept negative is the best document that is not the
    # positive and scores at most (positive score - margin).
    model = Embedder.load("default", device="cpu")
    texts = [d["text"] for d in docs]
    d_emb = model.encode(texts)
    by_id = {p["id"]: p for p in pairs}
    for row in rows:
        q, p = model.encode([by_id[row["id"]]["query"], row["positive"]])
        scores = d_emb @ q
        ceiling = float(q @ p) - 0.02
        allowed = [
            j for j in np.argsort(-scores)[:20] if texts[j] != row["positive"] and scores[j] <= ceiling
        ]
        assert row["negative"] == texts[allowed[0]] != row["positive"]
        assert row["negative_score"] == pytest.approx(float(scores[allowed[0]]), abs=1e-4)
        assert row["negative_score"] <= row["positive_score"] - 0.02 + 1e-6

    # Rerun with other mining settings: the vectors are reused (every embed fragment skipped).
    strict = run(margin=5.0)
    assert all(e["fragments_skipped"] == 1 for e in strict["embed"].values())
    assert strict["rows"] == 0 and strict["rejected"] == 42  # nothing scores below positive - 5

    approx = run(index="faiss")
    mined = {r["id"]: r["negative_id"] for r in read_jsonl(tmp_path / "mined" / "mined.jsonl")}
    exact = {r["id"]: r["negative_id"] for r in rows}
    assert sum(mined.get(k) == v for k, v in exact.items()) >= 0.9 * len(exact)
    assert approx["index"] == "faiss"


def test_mine_config_checks() -> None:
    with pytest.raises(ValueError, match="index must be exact or faiss"):
        MineConfig(pairs="p", corpus="c", output="o", index="annoy")
    with pytest.raises(ValueError, match="skip_top"):
        MineConfig(pairs="p", corpus="c", output="o", top_k=5, skip_top=5)
