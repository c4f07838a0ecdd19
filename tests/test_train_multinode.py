"""Training across the nodes of a local multi-node Ray cluster (ray.cluster_utils.Cluster: a head and two
worker nodes, each its own raylet), with data, model, teacher, checkpoints, the exported model and the run
report on the loopback S3 server: GIST (contrastive with an in-loop guide model, read from S3 by each
worker) under ZeRO-3 with its eval data on S3, resumed from its checkpoint on S3, then its kept checkpoints
merged from S3 to S3; the two workers run on different nodes (asserted
from Ray's actor table). ZeRO-2 resumed on fewer workers is in test_train.py, a node lost mid-run in
test_train_elastic.py."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import DATA
from rayembed.config import EvalConfig, MergeConfig
from rayembed.eval.job import evaluate
from rayembed.io import download_dir, upload_dir
from rayembed.model import Embedder, resolve_model_path
from rayembed.train.config import TrainConfig
from rayembed.train.job import run_checkpoints, train
from rayembed.train.merge import merge, state_of

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
    upload_dir(DATA / "stsbenchmark" / "stsbenchmark", f"{ROOT}/sts", s3_endpoint)
    cfg = TrainConfig(
        data=f"{ROOT}/data/snli.jsonl", output_dir=f"{ROOT}/run", storage_path=f"{ROOT}/checkpoints",
        model=f"{ROOT}/model", loss="gist", teacher=f"{ROOT}/model", s3_endpoint_url=s3_endpoint,
        num_workers=2, placement_strategy="STRICT_SPREAD", zero_stage=3, batch_size=8, max_length=32, lr=1e-3,
        max_steps=2, checkpoint_every=1, eval={"beir_dir": None, "sts_file": f"{ROOT}/sts/sts-dev.csv"},
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

    run_report = json.loads(s3fs.S3FileSystem(endpoint_url=s3_endpoint).cat(report[0]))
    assert [h["step"] for h in run_report["history"]] == [1, 2, 3]
    exported = Embedder.load(resolve_model_path(f"{ROOT}/run/model", s3_endpoint), device="cpu")
    assert np.isfinite(exported.encode(["trained on two nodes"])).all()
    # the run's eval read its STS file from S3: the trained model's score is the one a local eval gives
    local_sts = {"beir_dir": None, "sts_file": str(DATA / "stsbenchmark" / "stsbenchmark" / "sts-dev.csv")}
    own = evaluate(EvalConfig(**local_sts), exported)["sts"]["32"]["spearman"]
    assert run_report["eval"]["after"]["sts"]["32"]["spearman"] == pytest.approx(own, abs=1e-6)

    # Merge reads the run's two kept ZeRO-3 checkpoints from S3 and writes the soup and its report there.
    _, kept = run_checkpoints(f"{ROOT}/checkpoints", cfg.run_name, s3_endpoint)
    assert len(kept) == 2
    soup = merge(
        MergeConfig(
            models=[f"s3://{k}" for k in kept], base=f"{ROOT}/model", output=f"{ROOT}/soup",
            calibration_texts=f"{ROOT}/data", text_column="query", int8_calibration_texts=16,
            eval={**local_sts, "sts_file": f"{ROOT}/sts/sts-dev.csv"}, s3_endpoint_url=s3_endpoint,
        )
    )  # fmt: skip
    assert soup["output"] == f"{ROOT}/soup"
    souped = Embedder.load(resolve_model_path(f"{ROOT}/soup", s3_endpoint), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        local = [download_dir(f"s3://{k}", Path(tmp, str(i)), s3_endpoint) for i, k in enumerate(kept)]
        base = Embedder.load(tiny_model, device="cpu")
        states = [state_of(str(p), base) for p in local]
    for k, v in souped.state_dict().items():
        torch.testing.assert_close(v, (states[0][k] + states[1][k]) / 2)
    assert set(souped.int8_scales) == {32}  # calibrated on the texts read from S3
    merge_report = json.loads(
        s3fs.S3FileSystem(endpoint_url=s3_endpoint).cat(f"{ROOT}/soup/merge_report.json")
    )
    own = evaluate(EvalConfig(**local_sts), souped)["sts"]["32"]["spearman"]
    assert merge_report["eval"]["soup"]["sts"]["32"]["spearman"] == pytest.approx(own, abs=1e-6)


def test_a_local_storage_path_is_refused_on_several_nodes(
    module_cluster: Any, snli_triples: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(data=str(snli_triples), output_dir=str(tmp_path / "run"), negative_column="negative")
    with pytest.raises(ValueError, match="is a local folder and this Ray cluster has 3 nodes"):
        train(cfg)


def test_the_export_runs_where_export_resources_say_and_the_driver_stays_small(
    module_cluster: Any, snli_triples: Path, tmp_path: Path
) -> None:
    """A LoRA run of a decoder whose weights (~310 MB) are more than the driver may take (half of them here):
    the export (ZeRO-3 shards gathered, adapters merged, int8 calibration, published) runs as a task on the
    node that has the resource `export_resources` names, and the driver's RSS grows by less than the limit
    (the export on the driver held the model at least once)."""
    import threading

    import psutil

    from rayembed.model.random_models import build_random_model

    heavy = build_random_model("qwen3", tmp_path / "heavy", "tiny-heavy")
    limit = (heavy / "model.safetensors").stat().st_size // 2
    node = module_cluster.add_node(num_cpus=1, resources={"export": 1})  # the large-memory node, say
    module_cluster.wait_for_nodes()
    cfg = TrainConfig(
        data=str(snli_triples), output_dir=str(tmp_path / "run"), model=str(heavy), shared_storage=True,
        lora_r=4, zero_stage=3, num_workers=2, batch_size=4, max_length=16, max_steps=1, checkpoint_every=1,
        int8_calibration_texts=8, export_resources={"num_cpus": 1, "resources": {"export": 1}},
    )  # fmt: skip
    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], me.memory_info().rss)

    before = me.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = train(cfg)
    finally:
        done.set()
        sampler.join()
        module_cluster.remove_node(node)
    assert result["export"]["node_id"] == node.node_id and result["export"]["pid"] != me.pid
    assert peak[0] - before < limit, (
        f"the driver grew by {(peak[0] - before) >> 20} MB (limit {limit >> 20} MB)"
    )
    exported = Embedder.load(result["output_dir"], device="cpu")
    assert not any("lora" in k for k in exported.state_dict()) and exported.int8_scales
    assert np.isfinite(exported.encode(["exported on its own node"])).all()
