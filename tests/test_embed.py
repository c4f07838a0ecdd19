"""Embed job: Ray Data -> actor pool -> Parquet, local and on a real S3-compatible server (moto)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

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
        input=str(scifact_docs), output=str(out), model=str(tiny_model), id_column="_id", title_column="title",
        fragment_bytes=100_000,  # the ~0.4 MB file becomes several line-aligned byte ranges
        num_actors=2,  # that two actors share (not one per fragment, each loading the model, on 2 cores)
    )  # fmt: skip
    summary = embed(cfg)
    rows = _rows(scifact_docs)
    assert summary["rows"] == len(rows) == 300
    assert summary["fragments"] == -(-scifact_docs.stat().st_size // 100_000) > 1
    table = pads.dataset(out, format="parquet").to_table()
    assert table.schema.field("id").type == pa.string()  # ids keep their type
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(r["_id"] for r in rows) and len(set(ids)) == len(ids)
    meta = pq.read_schema(sorted(out.glob("*.parquet"))[0]).metadata
    assert meta[b"rayembed.model"] == b"tiny-bert" and meta[b"rayembed.dim"] == b"32"
    assert meta[b"rayembed.precision"] == b"float32"
    # Same vectors as calling the one encode function directly, row by row.
    by_id = dict(zip(ids, table.column("embedding").to_numpy(zero_copy_only=False), strict=True))
    got = np.stack([by_id[r["_id"]] for r in rows])
    np.testing.assert_allclose(got, Embedder.load(tiny_model, device="cpu").encode(_texts(rows)), atol=1e-5)

    assert summary["truncated"] > 0 and summary["rejected"] == 0  # tiny model: max_length 64
    assert table.column("truncated").to_pylist().count(True) == summary["truncated"]
    summary_file = json.loads((out / "_summary.json").read_text())
    assert (
        summary_file["rows"] == 300 and summary_file["tokens"] > 0 and 0 <= summary_file["padding_ratio"] < 1
    )

    # A rerun finds every fragment committed: nothing is redone, nothing duplicated.
    files = sorted(p.name for p in out.glob("*.parquet"))
    again = embed(cfg)
    assert again["fragments_skipped"] == again["fragments"] == summary["fragments"] and again["run_rows"] == 0
    assert sorted(p.name for p in out.glob("*.parquet")) == files and again["rows"] == 300
    # Other settings into the same folder are refused; overwrite=true starts over.
    with pytest.raises(ValueError, match="other settings.*'dim': \\(32, 16\\)"):
        embed(dataclasses.replace(cfg, dim=16))
    assert embed(dataclasses.replace(cfg, dim=16, overwrite=True))["rows"] == 300


def test_embed_s3_parquet_binary(tiny_model: Path, scifact_docs: Path, s3_endpoint: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    rows = _rows(scifact_docs)
    table = pa.Table.from_pylist([{"doc_id": i, "body": r["text"]} for i, r in enumerate(rows)])
    for part in range(2):  # 2 files x 3 row groups of 50 -> fragments of >= 100 rows: 2 per file
        with fs.open(f"rayembed/lake/part-{part}.parquet", "wb") as f:
            pq.write_table(table.slice(part * 150, 150), f, row_group_size=50)
    from rayembed.io import upload_dir

    upload_dir(tiny_model, "s3://rayembed/models/embed-tiny", s3_endpoint)  # data, model and output on S3
    summary = embed(
        EmbedConfig(
            input="s3://rayembed/lake/",
            output="s3://rayembed/emb/",
            model="s3://rayembed/models/embed-tiny",
            id_column="doc_id",
            text_column="body",
            dim=16,
            precision="binary",
            fragment_rows=100,
            s3_endpoint_url=s3_endpoint,
        )
    )
    assert summary["rows"] == 300 and summary["fragments"] == 4
    fs.invalidate_cache()  # s3fs caches listings
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


def test_bad_rows_are_rejected_and_counted(tiny_model: Path, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    rows = [
        {"id": "a", "text": "fine", "lang": "en"},
        {"id": "b", "text": None, "lang": "en"},
        {"id": "c", "text": "   ", "lang": "de"},
        {"id": "d", "text": "word " * 500, "lang": "de"},
        {"id": "e", "text": "also fine", "lang": None},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    cfg = EmbedConfig(
        input=str(src),
        output=str(out),
        model=str(tiny_model),
        passthrough_columns=["lang"],
        partition_by="lang",
        cpu_dtype="bfloat16",  # the actors run the model in bfloat16, the vectors are still float32
    )
    summary = embed(cfg)
    assert summary["rows_in"] == 5 and summary["rows"] == 3 and summary["truncated"] == 1
    assert summary["rejected_by_reason"] == {"empty": 1, "null": 1}
    # One fragment: its one actor reserves the free CPUs, and runs as many threads as there are cores
    # for it (a local cluster has more logical CPUs than cores); the plan shows both.
    plan = summary["plan"]
    assert plan["actors"] == 1 and plan["cpus_per_actor"] >= 1
    assert plan["threads_per_actor"] == min(plan["cpus_per_actor"], len(os.sched_getaffinity(0)))
    rejects = pq.read_table(next((out / "_rejects").glob("*.parquet")))
    assert sorted(zip(rejects["id"].to_pylist(), rejects["reason"].to_pylist(), strict=True)) == [
        ("b", "null"),
        ("c", "empty"),
    ]
    got = pads.dataset(out, format="parquet", partitioning="hive").to_table()
    assert sorted(got["id"].to_pylist()) == ["a", "d", "e"]
    assert {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("_")} == {
        "lang=en",
        "lang=de",
        "lang=__null__",
    }
    assert dict(zip(got["id"].to_pylist(), got["truncated"].to_pylist(), strict=True))["d"] is True
    import torch

    vec = dict(zip(got["id"].to_pylist(), got["embedding"].to_numpy(zero_copy_only=False), strict=True))
    texts = ["fine", "also fine"]
    bf16 = Embedder.load(tiny_model, device="cpu", dtype=torch.bfloat16).encode(texts)
    np.testing.assert_array_equal(np.stack([vec["a"], vec["e"]]), bf16)  # the same encode function
    fp32 = Embedder.load(tiny_model, device="cpu").encode(texts)
    assert (bf16 * fp32).sum(1).min() > 0.99 and np.abs(bf16 - fp32).max() > 0  # close, not identical


def test_bad_input_is_refused_with_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"id": "a", "text": "fine"}) + "\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['body'\]"):
        embed(
            EmbedConfig(
                input=str(src), output=str(tmp_path / "o1"), model=str(tiny_model), text_column="body"
            )
        )
    with pytest.raises(FileNotFoundError, match="not found"):
        embed(EmbedConfig(input=str(src), output=str(tmp_path / "o3"), model=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        embed(
            EmbedConfig(
                input=str(tmp_path / "missing.jsonl"), output=str(tmp_path / "o4"), model=str(tiny_model)
            )
        )
    with pytest.raises(ValueError, match="holds files but no _manifest.json"):
        (tmp_path / "o5").mkdir()
        (tmp_path / "o5" / "old.parquet").write_bytes(b"x")
        embed(EmbedConfig(input=str(src), output=str(tmp_path / "o5"), model=str(tiny_model)))


def test_actor_plan_follows_free_cpus_and_fragments() -> None:
    import ray

    from rayembed.embed.job import plan_actors

    cfg = EmbedConfig(input="in", output="out")
    deadline = time.time() + 60  # actors of the tests before may still be handing their CPUs back
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.5)
    free = int(ray.available_resources()["CPU"])
    smallest = min(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
    # One fragment: one actor that gets the free CPUs as threads.
    assert plan_actors(cfg, 1) == (1, float(min(free, smallest)), 0.0, min(free, smallest))
    # Many fragments: one-thread actors, one per free CPU.
    assert plan_actors(cfg, 100) == (free, 1.0, 0.0, 1)
    assert plan_actors(dataclasses.replace(cfg, threads_per_actor=2, num_actors=1), 100) == (1, 2.0, 0.0, 2)
    with pytest.raises(ValueError, match="no GPUs"):
        plan_actors(dataclasses.replace(cfg, use_gpu=True), 1)


def test_gpu_actor_plan_takes_the_nodes_cpus_as_tokenizer_threads() -> None:
    from rayembed.embed.job import plan_for

    cfg = EmbedConfig(input="in", output="out")
    nodes = [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 32.0, "GPU": 1.0}, {"CPU": 4.0}]
    # One actor per GPU; each takes the smallest GPU node's CPUs per GPU (8), capped at 8.
    assert plan_for(cfg, 100, nodes, 52) == (3, 8.0, 1.0, 8)
    assert plan_for(cfg, 2, nodes, 52) == (2, 8.0, 1.0, 8)  # no more actors than fragments
    assert plan_for(cfg, 100, [{"CPU": 6.0, "GPU": 4.0}], 6) == (4, 1.0, 1.0, 1)
    assert plan_for(dataclasses.replace(cfg, threads_per_actor=3), 100, nodes, 52) == (3, 3.0, 1.0, 3)
    # use_gpu=false on a GPU cluster: CPU actors as usual
    assert plan_for(dataclasses.replace(cfg, use_gpu=False), 100, [{"CPU": 4.0, "GPU": 1.0}], 4) == (
        4,
        1.0,
        0.0,
        1,
    )


def test_actor_threads_never_exceed_the_cores_it_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from rayembed.embed.actor import cores_for

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a 2-core machine, 4 logical CPUs
    assert (cores_for(4), cores_for(2), cores_for(1), cores_for(0)) == (2, 2, 1, 1)


def test_embed_to_a_throttling_store_finishes_exactly_once(
    tiny_model: Path, scifact_docs: Path, s3_endpoint: str, s3_faults: Any
) -> None:
    """The loopback S3 server fails the actors' first 15 writes (PUT and POST under the output) with 500
    InternalError: botocore's own retries give up (5 attempts in ~2 s), the actors redo those fragments
    after a backoff, and every document is in the output once. (40-90 % of writes throttled with 503
    SlowDown pass within the client's retries alone: s3fs retries SlowDown 5 times over botocore's 5.)"""
    import s3fs

    # the actors' writes (staged files, commits, markers), not the driver's manifest and summary
    s3_faults.set(share=1.0, path="/rayembed/throttled/(_tmp/|_committed/|[^_])", status=500, limit=15)
    summary = embed(
        EmbedConfig(
            input=str(scifact_docs), output="s3://rayembed/throttled/", model=str(tiny_model),
            id_column="_id", fragment_bytes=100_000, num_actors=2, s3_endpoint_url=s3_endpoint,
        )
    )  # fmt: skip
    refused = s3_faults.failed
    s3_faults.set(share=0.0)
    ids = [r["_id"] for r in _rows(scifact_docs)]
    assert refused == 15  # the store did refuse writes
    assert summary["rows"] == len(ids) and summary["store_retries"] >= 1  # some past botocore's retries
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    got = pa.concat_tables(
        [pq.read_table(fs.open(f, "rb"), columns=["id"]) for f in fs.glob("rayembed/throttled/*.parquet")]
    )
    out = got.column("id").to_pylist()
    lost, duplicated = len(set(ids) - set(out)), len(out) - len(set(out))
    assert (lost, duplicated) == (0, 0) and sorted(out) == sorted(ids)
    from conftest import record

    record({"faults": {"embed_s3_refused_writes": {"refused_writes": refused, "lost": lost, "duplicated": duplicated,
            "fragments_redone": summary["store_retries"], "rows": len(ids)}}})  # fmt: skip
