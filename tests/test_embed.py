"""Embed job: Ray Data -> actor pool -> Parquet, local and on a real S3-compatible server (moto)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from rayembed.config import EmbedConfig
from rayembed.embed import embed
from rayembed.model import Embedder

pytestmark = pytest.mark.usefixtures("ray_local")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _texts(rows: list[dict]) -> list[str]:
    return [f"{r['title']} {r['text']}".strip() for r in rows]


def test_embed_local_jsonl(tiny_model: Path, scifact_docs: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    cfg = EmbedConfig(
        input=str(scifact_docs), output=str(out), model=str(tiny_model), id_column="_id", title_column="title"
    )
    summary = embed(cfg)
    rows = _rows(scifact_docs)
    assert summary["rows"] == len(rows) == 300
    table = pads.dataset(out, format="parquet").to_table()
    assert table.schema.field("id").type == pa.string()  # ids keep their type
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(r["_id"] for r in rows) and len(set(ids)) == len(ids)
    meta = pq.read_schema(next(out.glob("*.parquet"))).metadata
    assert meta[b"rayembed.model"] == b"tiny-bert" and meta[b"rayembed.dim"] == b"32"
    assert meta[b"rayembed.precision"] == b"float32"
    # Same vectors as calling the one encode function directly, row by row.
    by_id = dict(zip(ids, table.column("embedding").to_numpy(zero_copy_only=False), strict=True))
    got = np.stack([by_id[r["_id"]] for r in rows])
    np.testing.assert_allclose(got, Embedder.load(tiny_model, device="cpu").encode(_texts(rows)), atol=1e-5)

    with pytest.raises(ValueError, match="overwrite=true"):
        embed(cfg)


def test_embed_s3_parquet_binary(tiny_model: Path, scifact_docs: Path, s3_endpoint: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    rows = _rows(scifact_docs)
    table = pa.Table.from_pylist([{"doc_id": i, "body": r["text"]} for i, r in enumerate(rows)])
    for part in range(2):
        with fs.open(f"rayembed/lake/part-{part}.parquet", "wb") as f:
            pq.write_table(table.slice(part * 150, 150), f)
    summary = embed(
        EmbedConfig(
            input="s3://rayembed/lake/",
            output="s3://rayembed/emb/",
            model=str(tiny_model),
            id_column="doc_id",
            text_column="body",
            dim=16,
            precision="binary",
            s3_endpoint_url=s3_endpoint,
        )
    )
    assert summary["rows"] == 300
    files = fs.glob("rayembed/emb/*.parquet")
    assert files
    out = pa.concat_tables([pq.read_table(fs.open(f, "rb")) for f in files])
    assert sorted(out.column("id").to_pylist()) == list(range(300))
    assert out.schema.field("embedding").type == pa.list_(pa.uint8(), 2)  # 16 bits packed in 2 bytes
    assert (
        out.schema.metadata[b"rayembed.precision"] == b"binary"
        and out.schema.metadata[b"rayembed.dim"] == b"16"
    )
    first = Embedder.load(tiny_model, device="cpu").encode([rows[0]["text"]], dim=16, precision="binary")
    row0 = out.column("embedding").to_pylist()[out.column("id").to_pylist().index(0)]
    assert row0 == first[0].tolist()


def test_bad_input_is_refused_with_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text(
        "\n".join(json.dumps(r) for r in [{"id": "a", "text": "fine"}, {"id": "b", "text": None}]) + "\n"
    )
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['body'\]"):
        embed(
            EmbedConfig(
                input=str(src), output=str(tmp_path / "o1"), model=str(tiny_model), text_column="body"
            )
        )
    with pytest.raises(Exception, match="null/empty/non-string 'text', first id 'b'"):
        embed(EmbedConfig(input=str(src), output=str(tmp_path / "o2"), model=str(tiny_model)))
    with pytest.raises(FileNotFoundError, match="not found"):
        embed(EmbedConfig(input=str(src), output=str(tmp_path / "o3"), model=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        embed(
            EmbedConfig(
                input=str(tmp_path / "missing.jsonl"), output=str(tmp_path / "o4"), model=str(tiny_model)
            )
        )
