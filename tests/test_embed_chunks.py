"""The embed job on long documents: one row per chunk (offsets into the text, token count, the document's
hash and passthrough columns), plain and late chunking, and incremental versions whose current view holds
every current chunk once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from conftest import DATA
from rayembed.config import EmbedConfig
from rayembed.embed import embed
from rayembed.embed.versions import content_hash, current
from rayembed.model import Embedder
from rayembed.model import chunking as C

pytestmark = pytest.mark.usefixtures("ray_local")


def _docs() -> dict[str, str]:
    """Long documents (8 Wikipedia paragraphs each, ~1,000 tokens) and one short one."""
    rows = [json.loads(x) for x in (DATA / "wikitext-2" / "paragraphs.jsonl").read_text().splitlines()[:64]]
    docs = {str(i): "\n\n".join(r["text"] for r in rows[8 * i : 8 * i + 8]) for i in range(8)}
    return docs | {"short": "A document shorter than one chunk."}


def _lake(root: Path, docs: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    lines = [json.dumps({"id": k, "text": v, "source": f"wiki-{k}"}) for k, v in docs.items()]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _chunks(output: Path, view: bool = False) -> dict[tuple[str, int], dict]:
    table = current(pafs.LocalFileSystem(), str(output)) if view else pads.dataset(output).to_table()
    rows = table.to_pylist()
    keys = [(r["id"], r["chunk"]) for r in rows]
    assert len(keys) == len(set(keys)), "a chunk twice"
    return dict(zip(keys, rows, strict=True))


def test_chunked_embedding_writes_one_row_per_chunk_and_stays_exact_across_versions(
    tiny_model: Path, tmp_path: Path
) -> None:
    docs = _docs()
    cfg = EmbedConfig(
        input=str(_lake(tmp_path / "lake1", docs)), output=str(tmp_path / "v1"), model=str(tiny_model),
        passthrough_columns=["source"], chunking="chunks", chunk_tokens=48, chunk_overlap=8, progress=False,
    )  # fmt: skip
    summary = embed(cfg)
    got = _chunks(tmp_path / "v1")
    assert summary["rows"] == len(docs) and summary["chunks"] == len(got) > 8 * len(docs)
    assert summary["truncated"] == 0  # every chunk fits the window: nothing cut
    model = Embedder.load(tiny_model, device="cpu")
    for doc_id, text in docs.items():
        ks = sorted(k for d, k in got if d == doc_id)
        assert ks == list(range(len(ks))) and (len(ks) == 1) == (doc_id == "short")
        rows = [got[doc_id, k] for k in ks]
        assert {r["content_hash"] for r in rows} == {content_hash([text])[0].as_py()}
        assert {r["source"] for r in rows} == {f"wiki-{doc_id}"}
        pieces = [text[r["start"] : r["end"]] for r in rows]
        assert all(0 < r["tokens"] <= 48 for r in rows) and pieces[0] == text[: len(pieces[0])]
        assert text.endswith(pieces[-1])
        np.testing.assert_allclose(np.stack([r["embedding"] for r in rows]), model.encode(pieces), atol=1e-5)

    # Night 2: document 1 changed, 2 deleted, 9 new. Only 1 and 9 are embedded; the current view holds
    # every current chunk once, none of the old document 1's or of document 2.
    docs2 = {k: v for k, v in docs.items() if k != "2"} | {
        "1": docs["1"][: len(docs["1"]) // 3],
        "9": docs["0"][::-1],
    }
    v2 = embed(dataclasses.replace(cfg, input=str(_lake(tmp_path / "lake2", docs2)), output=str(tmp_path / "v2"),
                                   incremental_from=str(tmp_path / "v1")))  # fmt: skip
    assert (v2["rows"], v2["unchanged"], v2["deleted"]) == (2, len(docs2) - 2, 1)
    view = _chunks(tmp_path / "v2", view=True)
    assert {d for d, _ in view} == set(docs2)
    for doc_id, text in docs2.items():
        rows = [view[doc_id, k] for k in range(sum(d == doc_id for d, _ in view))]
        assert {r["content_hash"] for r in rows} == {content_hash([text])[0].as_py()}
        assert "".join(text[r["start"] : r["end"]] for r in rows[:1]) == text[: rows[0]["end"]]
    assert len([k for k in view if k[0] == "1"]) < len([k for k in got if k[0] == "1"])
    # another chunking than the base's is refused
    with pytest.raises(ValueError, match="other settings.*chunking"):
        embed(dataclasses.replace(cfg, output=str(tmp_path / "v3"), incremental_from=str(tmp_path / "v1"),
                                  chunk_tokens=32))  # fmt: skip


def test_late_chunking_in_the_job_and_what_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    docs = {k: v for k, v in _docs().items() if k in ("0", "1", "short")}
    cfg = EmbedConfig(input=str(_lake(tmp_path / "lake", docs)), output=str(tmp_path / "late"),
                      model=str(tiny_model), chunking="late", progress=False)  # fmt: skip
    summary = embed(cfg)
    got = _chunks(tmp_path / "late")
    model = Embedder.load(tiny_model, device="cpu")
    assert summary["chunks"] == len(got)
    p, want, _ = C.encode_chunks(model, list(docs.values()), "late")  # chunks of 62 tokens: the whole window
    ids = list(docs)
    keys = [(ids[d], k) for d, k in zip(p.doc, p.index, strict=True)]
    assert sorted(keys) == sorted(got) and max(p.tokens) == 62
    np.testing.assert_allclose(np.stack([got[k]["embedding"] for k in keys]), want, atol=1e-5)

    with pytest.raises(ValueError, match="chunk_tokens 63 does not fit the model's window: 62 at most"):
        embed(dataclasses.replace(cfg, output=str(tmp_path / "big"), chunk_tokens=63))
    with pytest.raises(ValueError, match="chunking must be null, chunks or late"):
        dataclasses.replace(cfg, chunking="sentences")
    with pytest.raises(ValueError, match="chunk_overlap must be >= 0 and less than chunk_tokens"):
        dataclasses.replace(cfg, chunk_tokens=16, chunk_overlap=16)
