"""Incremental re-embedding: a lake gains, changes and loses rows between runs; each run embeds only
new and changed rows, and the versions together hold every current id exactly once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import DATA
from rayembed.config import EmbedConfig
from rayembed.embed import embed
from rayembed.embed.versions import current
from rayembed.model import Embedder

pytestmark = pytest.mark.usefixtures("ray_local")


def _lake(root: Path, rows: dict[str, str]) -> Path:
    """Two JSONL files (ids split by parity)."""
    root.mkdir(parents=True, exist_ok=True)
    for part in (0, 1):
        lines = [json.dumps({"id": k, "text": v}) for k, v in rows.items() if int(k) % 2 == part]
        (root / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _view(output: Path) -> dict[str, np.ndarray]:
    table = current(pafs.LocalFileSystem(), str(output))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id twice in the current view"
    return dict(zip(ids, np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), strict=True))


def test_only_new_and_changed_rows_are_embedded_and_the_union_is_exact(
    tiny_model: Path, tmp_path: Path
) -> None:
    from rayembed.data.readers import read_jsonl

    docs = [d["text"] for _, d in zip(range(40), read_jsonl(DATA / "scifact" / "corpus.jsonl"), strict=False)]
    rows = {str(i): docs[i] for i in range(30)}
    common = {"model": str(tiny_model), "id_column": "id", "progress": False}
    v1 = embed(EmbedConfig(input=str(_lake(tmp_path / "lake1", rows)), output=str(tmp_path / "v1"), **common))
    assert v1["rows"] == 30

    rows |= {
        "3": docs[33],
        "17": docs[37],
        "30": docs[30],
        "31": docs[31],
        "8": "  ",
    }  # 2 changed, 2 new, 1 emptied
    del rows["5"], rows["20"]  # 2 deleted
    # compared in ranges of ~8 ids (4 tasks), against a scan of v1's own files (a full run has no _keys)
    v2 = embed(EmbedConfig(input=str(_lake(tmp_path / "lake2", rows)), output=str(tmp_path / "v2"),
                           incremental_from=str(tmp_path / "v1"), bucket_ids=8, **common))  # fmt: skip
    assert v2["change_detection"]["ranges"] == 4 and v2["change_detection"]["base_ids"] == 30
    assert v2["rows"] == 4 and v2["unchanged"] == 25 and v2["rejected"] == 1
    assert v2["deleted"] == 3  # 5 and 20, and 8 whose text is now empty (its old vector is stale)
    view = _view(tmp_path / "v2")
    valid = {k: v for k, v in rows.items() if v.strip()}
    assert set(view) == set(valid)
    model = Embedder.load(tiny_model, device="cpu")
    ids = sorted(valid)
    np.testing.assert_allclose(
        np.stack([view[i] for i in ids]), model.encode([valid[i] for i in ids]), atol=1e-5
    )

    _key_index_is_the_view(tmp_path / "v2", 2)
    assert [p.name for p in (tmp_path / "v2" / "_plan").iterdir()] == [
        "_done.json"
    ]  # its files served their run

    # 8 ranges now, each reading its part of v2's 4 key files
    v3 = embed(EmbedConfig(input=str(tmp_path / "lake2"), output=str(tmp_path / "v3"),
                           incremental_from=str(tmp_path / "v2"), bucket_ids=4, **common))  # fmt: skip
    assert v3["rows"] == 0 and v3["unchanged"] == len(valid) and v3["deleted"] == 0  # nothing to do
    assert v3["change_detection"]["ranges"] == 8
    # both fragments committed from the plan's scan by the driver, not read again and no actor started (no
    # model loaded); the rejected row is still reported
    assert v3["fragments_unchanged"] == v3["fragments"] == 2 and v3["plan"] == {}
    rejects = pq.read_table(tmp_path / "v3" / "_rejects")
    assert v3["rejected"] == 1 and rejects.column("id").to_pylist() == ["8"] and v3["run_rows"] == 0
    assert set(_view(tmp_path / "v3")) == set(valid)
    _key_index_is_the_view(tmp_path / "v3", 3)

    # a version written before the key index: its chain is walked once instead
    shutil.rmtree(tmp_path / "v3" / "_keys")
    rows["0"] = docs[39]
    v4 = embed(EmbedConfig(input=str(_lake(tmp_path / "lake4", rows)), output=str(tmp_path / "v4"),
                           incremental_from=str(tmp_path / "v3"), **common))  # fmt: skip
    assert (
        v4["rows"] == 1
        and v4["unchanged"] == len(valid) - 1
        and v4["change_detection"]["base_ids"] == len(valid)
    )
    assert set(_view(tmp_path / "v4")) == set(valid)
    assert v4["fragments_unchanged"] == 1 and v4["plan"]["actors"] >= 1  # part-1 has nothing new


def _key_index_is_the_view(version: Path, bits: int) -> None:
    """_keys: every current id once, with its row's content hash, in the file of its range of h."""
    from rayembed.embed.keys import span

    fs = pafs.LocalFileSystem()
    assert json.loads((version / "_keys" / "_index.json").read_text())["bits"] == bits
    view = current(fs, str(version), ["id", "content_hash"])
    expect = dict(zip(view.column("id").to_pylist(), view.column("content_hash").to_pylist(), strict=True))
    found: dict[str, str] = {}
    for path in sorted((version / "_keys").glob("*.parquet")):
        part = pq.read_table(path)
        lo, hi = span(int(path.stem.split("-")[1]), bits)
        assert all(lo <= h <= hi for h in part.column("h").to_pylist()), path
        found |= dict(
            zip(part.column("id").to_pylist(), part.column("content_hash").to_pylist(), strict=True)
        )
    assert found == expect and len(list((version / "_keys").glob("*.parquet"))) == 1 << bits


def test_an_incremental_run_must_embed_as_its_base_did(tiny_model: Path, tmp_path: Path) -> None:
    lake = _lake(tmp_path / "lake", {"0": "a first text", "1": "a second text"})
    common = {"model": str(tiny_model), "id_column": "id", "progress": False}
    embed(EmbedConfig(input=str(lake), output=str(tmp_path / "v1"), **common))
    with pytest.raises(ValueError, match="embedded with other settings"):
        embed(EmbedConfig(input=str(lake), output=str(tmp_path / "v2"), incremental_from=str(tmp_path / "v1"),
                          dim=16, **common))  # fmt: skip
    with pytest.raises(FileNotFoundError, match="not an embed output"):
        embed(
            EmbedConfig(
                input=str(lake),
                output=str(tmp_path / "v3"),
                incremental_from=str(tmp_path / "lake"),
                **common,
            )
        )
