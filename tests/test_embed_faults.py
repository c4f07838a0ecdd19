"""Embed on a 3-node local Ray cluster survives a killed actor and a lost node: 0 lost, 0 duplicated ids."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest

from conftest import DATA
from rayembed.config import EmbedConfig
from rayembed.embed import embed

# 400 rows a file: a fragment then takes ~1 s, so the job still runs for seconds after its first commit
# (with 100, the other fragments could all finish within ~1.5 s, before a fault found an actor to hit).
FILES, ROWS = 8, 400


@pytest.fixture
def lake(tmp_path: Path) -> tuple[Path, set[str]]:
    """8 JSONL files x 400 real SciFact documents, ids unique across files."""
    from rayembed.data.readers import read_jsonl

    docs = [d for _, d in zip(range(ROWS), read_jsonl(DATA / "scifact" / "corpus.jsonl"), strict=False)]
    ids = set()
    root = tmp_path / "lake"
    root.mkdir()
    for f in range(FILES):
        rows = [{"id": f"{f}-{d['_id']}", "text": d["text"]} for d in docs]
        ids.update(r["id"] for r in rows)
        (root / f"part-{f:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, ids


def _embedding_actors() -> list[dict[str, Any]]:
    import ray._private.state as state

    return [
        a for a in state.actors().values() if a["State"] == "ALIVE" and "MapWorker" in a["ActorClassName"]
    ]


def _run_with_fault(cfg: EmbedConfig, fault: Callable[[], None]) -> None:
    """Run the job in a thread; inject `fault` once the first fragment is committed; rerun if the job failed."""
    errors: list[BaseException] = []
    job = threading.Thread(target=lambda: _capture(errors, cfg))
    job.start()
    committed = Path(cfg.output) / "_committed"
    deadline = time.time() + 240
    while time.time() < deadline and not (committed.is_dir() and any(committed.glob("*.json"))):
        time.sleep(0.2)
    assert len(list(committed.glob("*.json"))) < FILES, "the job finished before the fault could be injected"
    try:
        fault()
    finally:  # even if the fault could not be injected: no job left running into the next test
        job.join(timeout=400)
    assert not job.is_alive()
    if errors:  # the run may fail; the rerun must finish the rest exactly once
        embed(cfg)


def _capture(errors: list[BaseException], cfg: EmbedConfig) -> None:
    try:
        embed(cfg)
    except BaseException as e:  # noqa: BLE001
        errors.append(e)


def _assert_exactly_once(out: Path, ids: set[str], fault: str, chunks: dict[str, int] | None = None) -> None:
    """Every id once or, with `chunks` (id -> how many chunks it has), every (id, chunk) once."""
    table = pads.dataset(out, format="parquet").to_table()
    got = table.column("id").to_pylist()
    want = ids
    if chunks is not None:
        got = list(zip(got, table.column("chunk").to_pylist(), strict=True))
        want = {(i, k) for i in ids for k in range(chunks[i])}
    lost, duplicated = len(want - set(got)), len(got) - len(set(got))
    assert (lost, duplicated) == (0, 0) and set(got) == want
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows"] == len(ids) and summary["fragments"] == FILES
    assert summary["chunks"] == (len(want) if chunks else 0)
    from conftest import record

    record({"faults": {fault: {"rows": len(got), "lost": lost, "duplicated": duplicated}}})


def _cfg(model: Path, lake: Path, out: Path) -> EmbedConfig:
    # Small chunks so a fragment takes a while: the fault lands mid-run.
    return EmbedConfig(
        input=str(lake),
        output=str(out),
        model=str(model),
        chunk_rows=10,
        batch_size=4,
        threads_per_actor=1,
        progress=False,
    )


def test_killed_actor(
    module_cluster: Any, tiny_model: Path, lake: tuple[Path, set[str]], tmp_path: Path
) -> None:
    """Chunked (each abstract is several chunks of the tiny model's 62-token window): no chunk lost or
    written twice."""
    from rayembed.model import Embedder
    from rayembed.model.chunking import plan

    root, _ = lake
    for f in root.glob("*.jsonl"):  # 100 documents a file: chunked, a fragment still takes ~1 s
        f.write_text("".join(f.read_text().splitlines(keepends=True)[:100]))
    cfg = dataclasses.replace(_cfg(tiny_model, root, tmp_path / "out"), chunking="chunks", chunk_overlap=8)
    rows = [json.loads(x) for f in sorted(root.glob("*.jsonl")) for x in f.read_text().splitlines()]
    ids = {r["id"] for r in rows}
    p = plan(Embedder.load(tiny_model, device="cpu").tokenizer, [r["text"] for r in rows], 62, 8)
    chunks = Counter(rows[d]["id"] for d in p.doc)
    assert min(chunks.values()) >= 2

    def kill_actor() -> None:
        victim = _embedding_actors()[0]
        os.kill(victim["Pid"], signal.SIGKILL)

    _run_with_fault(cfg, kill_actor)
    _assert_exactly_once(Path(cfg.output), ids, "embed_actor_sigkill", dict(chunks))


def test_lost_worker_node(  # last in this module: it removes a node of the module's cluster
    module_cluster: Any, tiny_model: Path, lake: tuple[Path, set[str]], tmp_path: Path
) -> None:
    root, ids = lake
    cfg = _cfg(tiny_model, root, tmp_path / "out")

    def kill_node() -> None:
        deadline, busy, nodes = time.time() + 60, set(), []
        while not nodes and time.time() < deadline:  # an actor may be (re)starting right now
            busy = {a["Address"]["NodeID"] for a in _embedding_actors()}
            nodes = [n for n in module_cluster.worker_nodes if n.node_id in busy]
            time.sleep(0.2)
        assert nodes, f"no embedding actor on a worker node (actors on {busy})"
        module_cluster.remove_node(nodes[0], allow_graceful=False)

    _run_with_fault(cfg, kill_node)
    _assert_exactly_once(Path(cfg.output), ids, "embed_node_lost")
