"""Lake tables in and out: an Iceberg table (SQL catalog on SQLite; warehouse on local disk and on the
loopback S3 server) and a Delta table as input, an Iceberg table as a second output; bad schemas are
refused before any work."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DATA, wait_for
from rayembed.config import EmbedConfig
from rayembed.embed import embed
from rayembed.model import Embedder

pytestmark = pytest.mark.usefixtures("ray_local")


def _docs(start: int, n: int) -> pa.Table:
    from rayembed.data.readers import read_jsonl

    rows = [
        d
        for i, d in zip(range(start + n), read_jsonl(DATA / "scifact" / "corpus.jsonl"), strict=False)
        if i >= start
    ]
    return pa.table(
        {
            "id": [r["_id"] for r in rows],
            "title": [r["title"] for r in rows],
            "text": [r["text"] for r in rows],
        }
    )


def _catalog(tmp_path: Path, warehouse: str, s3_endpoint: str | None) -> dict[str, Any]:
    props = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": warehouse}
    if s3_endpoint:
        props |= {"s3.endpoint": s3_endpoint, "s3.access-key-id": "testing", "s3.secret-access-key": "testing",
                  "s3.region": "us-east-1"}  # fmt: skip
    return props


@pytest.mark.parametrize("where", ["local", "s3"])
def test_iceberg_table_in_and_out(tiny_model: Path, tmp_path: Path, s3_endpoint: str, where: str) -> None:
    from rayembed.embed.tables import catalog

    warehouse = f"file://{tmp_path}/wh" if where == "local" else f"s3://rayembed/wh-{tmp_path.name}"
    props = _catalog(tmp_path, warehouse, s3_endpoint if where == "s3" else None)
    cat = catalog(props)
    cat.create_namespace("lake")
    table = cat.create_table("lake.docs", schema=_docs(0, 1).schema)
    table.append(_docs(0, 40))
    table.append(_docs(40, 30))  # two commits: two data files
    cfg = EmbedConfig(input="lake.docs", input_format="iceberg", iceberg_catalog=props, output=str(tmp_path / "out"),
                      model=str(tiny_model), id_column="id", title_column="title", s3_endpoint_url=s3_endpoint,
                      iceberg_append="lake.embeddings", progress=False)  # fmt: skip
    first = embed(cfg)
    assert first["rows"] == 70 and first["fragments"] == 2
    assert first["iceberg_append"] == {"table": "lake.embeddings", "mode": "append", "rows": 70, "deleted": 0,
                                       "applied": True}  # fmt: skip
    out = cat.load_table("lake.embeddings").scan().to_arrow()
    assert sorted(out.column("id").to_pylist()) == sorted(_docs(0, 70).column("id").to_pylist())
    docs = _docs(0, 70)
    model = Embedder.load(tiny_model, device="cpu")
    expect = model.encode(
        [
            f"{h} {t}"
            for h, t in zip(docs.column("title").to_pylist(), docs.column("text").to_pylist(), strict=True)
        ]
    )
    got = dict(zip(out.column("id").to_pylist(), out.column("embedding").to_pylist(), strict=True))
    np.testing.assert_allclose([got[i] for i in docs.column("id").to_pylist()], expect, atol=1e-5)
    again = embed(cfg)  # everything committed, already appended: nothing twice
    assert again["fragments_skipped"] == 2 and again["iceberg_append"]["applied"] is False
    assert cat.load_table("lake.embeddings").scan().to_arrow().num_rows == 70
    table.append(_docs(70, 5))  # the table moves on: resuming into the same output is refused
    with pytest.raises(ValueError, match="snapshot"):
        embed(cfg)


def test_iceberg_append_carries_chunk_rows(tiny_model: Path, tmp_path: Path) -> None:
    from rayembed.embed.tables import catalog

    props = _catalog(tmp_path, f"file://{tmp_path}/wh", None)
    lake = tmp_path / "docs.parquet"
    pq.write_table(_docs(0, 12), lake)
    cfg = EmbedConfig(input=str(lake), output=str(tmp_path / "out"), model=str(tiny_model), chunking="chunks",
                      iceberg_catalog=props, iceberg_append="lake.chunks", progress=False)  # fmt: skip
    summary = embed(cfg)
    out = catalog(props).load_table("lake.chunks").scan().to_arrow()
    keys = list(zip(out.column("id").to_pylist(), out.column("chunk").to_pylist(), strict=True))
    assert summary["rows"] == 12 and summary["chunks"] == out.num_rows == len(set(keys)) > 24
    texts = dict(
        zip(_docs(0, 12).column("id").to_pylist(), _docs(0, 12).column("text").to_pylist(), strict=True)
    )
    for r in out.select(["id", "start", "end", "tokens"]).to_pylist():
        assert len(texts[r["id"]][r["start"] : r["end"]]) > 0 and 0 < r["tokens"] <= 62


def test_delta_table_in_and_nights_by_its_change_feed_and_by_its_log(
    tiny_model: Path, tmp_path: Path, s3_endpoint: str
) -> None:
    """A Delta table with a change data feed, on the loopback S3 server, embedded whole; then, after an
    append, a delete and an update (delta-rs rewrites the files it touches), a night reads only the rows
    the feed lists (5 inserted, 1 updated: not the 13 other rows of the file the delete rewrote, nor the 14
    of the update's), netted over 2 ranges; the same night by the log's file diff (`change_feed=false`)
    reads only the files added since. Both views equal the table as it is now, each vector a fresh
    embedding of its row. A night with no commit since reads nothing; a rerun of a finished feed night
    redoes nothing."""
    import pyarrow.fs as pafs
    from deltalake import DeltaTable, write_deltalake

    from rayembed.embed.versions import current

    uri = "s3://rayembed/delta-nights/table"
    store = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ALLOW_HTTP": "true", "AWS_S3_ALLOW_UNSAFE_RENAME": "true"}
    for k in range(3):
        write_deltalake(uri, _docs(15 * k, 15), mode="append", storage_options=store,
                        configuration={"delta.enableChangeDataFeed": "true"})  # fmt: skip
    common = {"input": uri, "input_format": "delta", "model": str(tiny_model), "id_column": "id",
              "progress": False, "s3_endpoint_url": s3_endpoint}  # fmt: skip
    result = embed(EmbedConfig(output=str(tmp_path / "out"), **common))
    assert result["rows"] == 45 and result["fragments"] == 3
    ids = pq.read_table(tmp_path / "out", columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(_docs(0, 45).column("id").to_pylist())

    write_deltalake(uri, _docs(45, 5), mode="append", storage_options=store)  # a fourth file
    table = DeltaTable(uri, storage_options=store)
    table.delete(f"id = '{ids[0]}' OR id = '{ids[1]}'")  # the file of ids[0:2] rewritten without them
    table.update(
        {"text": "'a new text for this document'"}, predicate=f"id = '{ids[20]}'"
    )  # its file rewritten
    base = str(tmp_path / "out")
    night = EmbedConfig(output=str(tmp_path / "v2"), incremental_from=base, bucket_ids=8, **common)
    fed = embed(night)
    assert fed["change_detection"] | {"base_ids": 0} == {
        "path": "delta change data feed", "since": 2, "feed_rows": 9, "changed_rows": 6, "gone_rows": 2,
        "ranges": 8, "base_ids": 0,
    }  # fmt: skip
    assert fed["rows_in"] == fed["rows"] == 6 and fed["deleted"] == 2 and fed["unchanged"] == 0
    logged = embed(
        EmbedConfig(output=str(tmp_path / "v2-log"), incremental_from=base, change_feed=False, **common)
    )
    detected = logged["change_detection"]
    assert detected["path"] == "delta log diff"
    assert detected["files_skipped"] == 1 and detected["files_removed"] == 2  # the third file: not read
    assert logged["fragments"] == detected["files_added"] == 3
    assert logged["rows"] == 6 and logged["deleted"] == 2 and logged["rows_in"] == 5 + 13 + 15
    # the views: the table as it is now, each row's vector a fresh embedding of its text
    now = DeltaTable(uri, storage_options=store).to_pyarrow_table().sort_by("id")
    fresh = Embedder.load(tiny_model, device="cpu").encode(now.column("text").cast(pa.string()).to_pylist())
    for version in ("v2", "v2-log"):
        view = current(pafs.LocalFileSystem(), str(tmp_path / version)).sort_by("id")
        assert view.column("id").to_pylist() == now.column("id").cast(pa.string()).to_pylist()
        np.testing.assert_allclose(
            np.stack(view.column("embedding").to_numpy(zero_copy_only=False)), fresh, atol=1e-5
        )
    assert not (tmp_path / "v2" / "_feed" / "rows").exists()  # dropped with the plan's files
    again = embed(night)
    assert again["fragments_skipped"] == again["fragments"] == fed["fragments"] and again["rows"] == 6
    quiet = embed(EmbedConfig(output=str(tmp_path / "v3"), incremental_from=str(tmp_path / "v2"), **common))
    assert quiet["change_detection"]["feed_rows"] == 0 and quiet["rows_in"] == 0 and quiet["deleted"] == 0


def test_a_change_feed_whose_files_are_gone_is_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    """A VACUUM that removed `_change_data/` files the night needs: the error names the way out."""
    import shutil

    from deltalake import DeltaTable, write_deltalake

    from rayembed.embed.feed import stream_feed

    path = tmp_path / "delta"
    write_deltalake(str(path), _docs(0, 5), configuration={"delta.enableChangeDataFeed": "true"})
    DeltaTable(str(path)).delete("id = '" + _docs(0, 1).column("id")[0].as_py() + "'")
    shutil.rmtree(path / "_change_data")
    cfg = EmbedConfig(input=str(path), output=str(tmp_path / "out"), input_format="delta",
                      model=str(tiny_model), id_column="id")  # fmt: skip
    (tmp_path / "raw").mkdir()
    with pytest.raises(RuntimeError, match=r"feed of versions 1\.\.1 cannot be read .*change_feed=false"):
        stream_feed(dataclasses.asdict(cfg), {}, 0, 1, str(tmp_path / "raw"))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pa.table({"id": ["a"], "text": [7]}), "text column 'text' is int64, not a string"),
        (pa.table({"doc": ["a"], "text": ["x"]}), r"lacks column\(s\) \['id'\]"),
    ],
)
def test_bad_schemas_are_refused_before_any_work(
    tiny_model: Path, tmp_path: Path, table: pa.Table, message: str
) -> None:
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=message):
        embed(EmbedConfig(input=str(tmp_path / "bad.parquet"), output=str(tmp_path / "out"), model=str(tiny_model),
                          id_column="id", progress=False))  # fmt: skip
    assert not (tmp_path / "out").exists()  # nothing was started or written


def test_an_iceberg_table_follows_the_nightly_versions(
    tiny_model: Path, tmp_path: Path, s3_endpoint: str
) -> None:
    """`iceberg_append` with `incremental_from` (SQL catalog, warehouse on the loopback S3 server): after
    each night the table equals `versions.current()` of that night's version, brought there in one commit
    (changed rows replaced, deleted ids removed); a rerun applies nothing twice; a version built on another
    base than the table's replaces the table by its whole view."""
    import pyarrow.fs as pafs

    from rayembed.embed.tables import TAG, catalog
    from rayembed.embed.versions import current
    from test_embed_incremental import _lake

    props = _catalog(tmp_path, f"s3://rayembed/wh-nightly-{tmp_path.name}", s3_endpoint)
    docs = {str(i): f"document {i}: a paragraph of the lake, as written on night one" for i in range(20)}
    nights: list[dict[str, str]] = [dict(docs)]
    docs |= {"2": "changed on night two", "9": "changed on night two too", "20": "new on night two"}
    del docs["4"], docs["13"]
    nights += [dict(docs), dict(docs)]  # night three: nothing changed
    docs |= {"4": "back on night four", "0": "changed on night four"}
    nights.append(dict(docs))

    def night(k: int, base: int | None) -> dict[str, Any]:
        cfg = EmbedConfig(input=str(_lake(tmp_path / f"lake{k}", nights[k - 1])), output=str(tmp_path / f"v{k}"),
                          model=str(tiny_model), id_column="id", progress=False, iceberg_catalog=props,
                          iceberg_append="lake.vectors", incremental_from=str(tmp_path / f"v{base}") if base else None)  # fmt: skip
        return embed(cfg)["iceberg_append"]

    def table_equals_view(k: int) -> pa.Table:
        table = catalog(props).load_table("lake.vectors")
        got, view = (
            table.scan().to_arrow().sort_by("id"),
            current(pafs.LocalFileSystem(), str(tmp_path / f"v{k}")),
        )
        view = view.sort_by("id")
        assert got.column("id").to_pylist() == view.column("id").to_pylist() == sorted(nights[k - 1])
        np.testing.assert_array_equal(np.stack(got.column("embedding").to_pylist()),
                                      np.stack(view.column("embedding").to_pylist()))  # fmt: skip
        assert table.properties[TAG] == str(tmp_path / f"v{k}")
        return got

    assert night(1, None) | {"rows": 20} == {
        "table": "lake.vectors",
        "mode": "append",
        "rows": 20,
        "deleted": 0,
        "applied": True,
    }
    table_equals_view(1)
    snapshots = len(catalog(props).load_table("lake.vectors").snapshots())
    two = night(2, 1)
    assert (
        two["mode"] == "upsert" and two["rows"] == 3 and two["deleted"] == 5
    )  # 2, 9, 20 re-embedded; 4, 13 gone
    table_equals_view(2)
    assert night(2, 1)["applied"] is False  # a rerun of night two: nothing twice
    assert night(3, 2) == {
        "table": "lake.vectors",
        "mode": "upsert",
        "rows": 0,
        "deleted": 0,
        "applied": True,
    }
    table_equals_view(3)
    assert night(4, 3)["mode"] == "upsert"
    table_equals_view(4)
    assert len(catalog(props).load_table("lake.vectors").snapshots()) > snapshots
    # a version on another base than the table's (night four redone from night two): the whole view
    redo = EmbedConfig(input=str(tmp_path / "lake4"), output=str(tmp_path / "v5"), model=str(tiny_model),
                       id_column="id", progress=False, iceberg_catalog=props, iceberg_append="lake.vectors",
                       incremental_from=str(tmp_path / "v2"))  # fmt: skip
    assert embed(redo)["iceberg_append"]["mode"] == "replace"
    nights.append(nights[3])
    table_equals_view(5)


def _in_session(sid: int) -> list[int]:
    import psutil

    alive = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (OSError, psutil.Error):
            continue
    return alive


def test_a_killed_nightly_run_recovers_after_its_table_moved_on(tiny_model: Path, tmp_path: Path) -> None:
    """A nightly incremental run over an Iceberg table is killed (SIGKILL, its whole process group) after
    its first fragment committed; the table then moves on. Rerun as it was: refused, naming the snapshot
    it pinned. Resumed with `snapshot=<pinned>`: the same view as an uninterrupted run against that
    snapshot, row for row. Or discarded (`overwrite=true`): a version of the table as it is now."""
    import signal
    import subprocess

    import pyarrow.fs as pafs

    from rayembed.embed.tables import catalog
    from rayembed.embed.versions import current
    from recipes import RAYEMBED

    props = _catalog(tmp_path, f"file://{tmp_path}/wh", None)
    cat = catalog(props)
    cat.create_namespace("lake")
    table = cat.create_table("lake.docs", schema=_docs(0, 1).schema)
    for k in range(3):
        table.append(_docs(200 * k, 200))
    common = {"input": "lake.docs", "input_format": "iceberg", "iceberg_catalog": props, "model": str(tiny_model),
              "id_column": "id", "title_column": "title", "num_actors": 1, "progress": False}  # fmt: skip
    embed(EmbedConfig(output=str(tmp_path / "night1"), **common))
    for k in range(3, 7):  # the night's new documents: four files
        table.append(_docs(200 * k, 200))
    pinned = cat.load_table("lake.docs").current_snapshot().snapshot_id
    night2 = {**common, "output": str(tmp_path / "night2"), "incremental_from": str(tmp_path / "night1")}
    argv = [f"{k}={json.dumps(v)}" for k, v in night2.items()]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([RAYEMBED, "embed", *argv], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    committed = tmp_path / "night2" / "_committed"
    while proc.poll() is None and not (committed.is_dir() and any(committed.glob("*.json"))):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_for(lambda: not _in_session(proc.pid), 60)  # its Ray processes too: nothing commits later
    done = len(list(committed.glob("*.json")))
    assert 1 <= done < 4 and not (tmp_path / "night2" / "_summary.json").exists(), done  # killed mid-run
    table.append(_docs(1400, 100))  # the table moves on

    with pytest.raises(ValueError, match=f"snapshot {pinned}.*snapshot={pinned}.*overwrite=true"):
        embed(EmbedConfig(**night2))
    resumed = embed(EmbedConfig(**night2, snapshot=pinned))
    assert resumed["fragments_skipped"] == done
    clean = embed(EmbedConfig(**{**night2, "output": str(tmp_path / "clean")}, snapshot=pinned))
    assert clean["rows"] == 800  # the four new files
    view = {k: current(pafs.LocalFileSystem(), str(tmp_path / k)).sort_by("id") for k in ("night2", "clean")}
    assert view["night2"].column("id").to_pylist() == sorted(_docs(0, 1400).column("id").to_pylist())
    assert view["night2"].select(["id", "embedding"]).equals(view["clean"].select(["id", "embedding"]))

    discarded = embed(EmbedConfig(**night2, overwrite=True))  # the other way: start the night again, from now
    assert discarded["rows"] == 900 and discarded["fragments_skipped"] == 0
    now = current(pafs.LocalFileSystem(), str(tmp_path / "night2"))
    assert sorted(now.column("id").to_pylist()) == sorted(_docs(0, 1500).column("id").to_pylist())
    with pytest.raises(ValueError, match="is a version .* is built on"):
        embed(EmbedConfig(**{**night2, "output": str(tmp_path / "night1"), "incremental_from": str(tmp_path / "night2")},
                          overwrite=True))  # fmt: skip


def test_a_night_over_an_iceberg_table_reads_only_the_files_added_since(
    tiny_model: Path, tmp_path: Path
) -> None:
    """An incremental run over an Iceberg table reads only the data files its snapshot added since the
    base's (rows appended, deleted and changed through pyiceberg's copy-on-write commits); ids can only
    have gone from the files it removed. Its view equals, row for row, that of the same night found by
    hashing every row (`snapshot_diff=false`)."""
    import pyarrow.fs as pafs
    from pyiceberg.expressions import EqualTo, In

    from rayembed.embed.tables import catalog
    from rayembed.embed.versions import current

    props = _catalog(tmp_path, f"file://{tmp_path}/wh", None)
    cat = catalog(props)
    cat.create_namespace("lake")
    table = cat.create_table("lake.docs", schema=_docs(0, 1).schema)
    for k in range(4):
        table.append(_docs(50 * k, 50))  # four data files
    common = {"input": "lake.docs", "input_format": "iceberg", "iceberg_catalog": props, "model": str(tiny_model),
              "id_column": "id", "title_column": "title", "progress": False}  # fmt: skip
    embed(EmbedConfig(output=str(tmp_path / "v1"), **common))
    ids = _docs(0, 200).column("id").to_pylist()
    table = cat.load_table("lake.docs")
    table.append(_docs(200, 20))  # new documents: a fifth file
    table.delete(In("id", ids[3:5]))  # two deleted from the first file (rewritten without them)
    changed = _docs(60, 1).set_column(2, "text", pa.array(["a new text for this document"]))
    table.overwrite(changed, overwrite_filter=EqualTo("id", ids[60]))  # one changed in the second file
    assert not any(t.delete_files for t in table.scan().plan_files())  # copy-on-write: data files only

    diff = embed(EmbedConfig(output=str(tmp_path / "v2"), incremental_from=str(tmp_path / "v1"), **common))
    hashed = embed(EmbedConfig(output=str(tmp_path / "v2h"), incremental_from=str(tmp_path / "v1"),
                               snapshot_diff=False, **common))  # fmt: skip
    detected = diff["change_detection"]
    assert (
        detected["path"] == "iceberg snapshot diff" and hashed["change_detection"]["path"] == "content hash"
    )
    assert detected["files_skipped"] == 2 and detected["files_removed"] == 2  # files three and four: not read
    assert diff["fragments"] == detected["files_added"] < hashed["fragments"]
    assert diff["rows"] == hashed["rows"] == 21 and diff["deleted"] == hashed["deleted"] == 2
    views = [current(pafs.LocalFileSystem(), str(tmp_path / v)).sort_by("id") for v in ("v2", "v2h")]
    assert views[0].select(["id", "embedding"]).equals(views[1].select(["id", "embedding"]))
    assert views[0].column("id").to_pylist() == sorted(table.scan().to_arrow().column("id").to_pylist())
    quiet = embed(EmbedConfig(output=str(tmp_path / "v3"), incremental_from=str(tmp_path / "v2"), **common))
    assert (
        quiet["fragments"] == quiet["rows"] == quiet["deleted"] == 0
    )  # the table did not move: nothing read
    files = len(list(table.scan().plan_files()))
    assert (
        quiet["change_detection"]["files_skipped"] == files and quiet["change_detection"]["files_added"] == 0
    )
    assert current(pafs.LocalFileSystem(), str(tmp_path / "v3")).sort_by("id").equals(views[0])
