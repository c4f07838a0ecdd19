"""Training across the nodes of a local multi-node Ray cluster (ray.cluster_utils.Cluster: a head and two
worker nodes, each its own raylet), with data, model, teacher, checkpoints, the exported model and the run
report on the loopback S3 server: GIST (contrastive with an in-loop guide model, read from S3 by each
worker) under ZeRO-3, resumed from its checkpoint on S3; the two workers run on different nodes (asserted
from Ray's actor table). ZeRO-2 resumed on fewer workers is in test_train.py, a node lost mid-run in
test_train_elastic.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rayembed.io import upload_dir
from rayembed.model import Embedder, resolve_model_path
from rayembed.train.config import TrainConfig
from rayembed.train.job import train

ROOT = "s3://rayembed/multinode"


def _train_worker_nodes() -> dict[str, str]:
    """actor id -> node id of every Ray Train worker this cluster has run (Ray's actor table, dead ones too)."""
    import ray._private.state as state

    return {
        actor_id: a["Address"]["NodeID"]
        for actor_id, a in state.actors().items()
        if "RayTrainWorker" in a["ActorClassName"]
    }


def _s3_files(s3_endpoint: str, prefix: str) -> list[str]:
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3_endpoint).find(prefix)


def test_train_across_nodes_with_everything_on_s3(
    module_cluster: Any, tiny_model: Path, snli_triples: Path, s3_endpoint: str
) -> None:
    upload_dir(tiny_model, f"{ROOT}/model", s3_endpoint)
    upload_dir(snli_triples.parent, f"{ROOT}/data", s3_endpoint)
    cfg = TrainConfig(
        data=f"{ROOT}/data/snli.jsonl", output_dir=f"{ROOT}/run", storage_path=f"{ROOT}/checkpoints",
        model=f"{ROOT}/model", loss="gist", teacher=f"{ROOT}/model", s3_endpoint_url=s3_endpoint,
        num_workers=2, placement_strategy="STRICT_SPREAD", zero_stage=3, batch_size=8, max_length=32, lr=1e-3,
        max_steps=2, checkpoint_every=1,
    )  # fmt: skip
    first = train(cfg)
    nodes = set(_train_worker_nodes().values())
    assert len(nodes) == 2, "the two workers ran on two different nodes"
    assert first["step"] == 2 and first["checkpoint"].startswith(f"{ROOT}/checkpoints/")
    second = train(dataclasses.replace(cfg, max_steps=3))  # resumes from the checkpoint on S3
    assert second["resumed_from"] == 2 and second["step"] == 3
    files = _s3_files(s3_endpoint, "rayembed/multinode")
    ranks = [f for f in files if f.endswith("optim_states.pt")]
    assert {f.rsplit("/", 1)[1][:16] for f in ranks} == {
        "zero_pp_rank_0_m",
        "zero_pp_rank_1_m",
    }  # both nodes' shards
    assert any(
        f.endswith("zero_pp_rank_1_mp_rank_00_model_states.pt") for f in files
    )  # ZeRO-3: parameters too
    assert any(f.endswith("run/model/config.json") for f in files)
    report = [f for f in files if f.endswith("run/report/report.json")]
    assert report
    import s3fs

    history = json.loads(s3fs.S3FileSystem(endpoint_url=s3_endpoint).cat(report[0]))["history"]
    assert [h["step"] for h in history] == [1, 2, 3]
    exported = Embedder.load(resolve_model_path(f"{ROOT}/run/model", s3_endpoint), device="cpu")
    assert np.isfinite(exported.encode(["trained on two nodes"])).all()


def test_a_local_storage_path_is_refused_on_several_nodes(
    module_cluster: Any, snli_triples: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(data=str(snli_triples), output_dir=str(tmp_path / "run"), negative_column="negative")
    with pytest.raises(ValueError, match="is a local folder and this Ray cluster has 3 nodes"):
        train(cfg)
