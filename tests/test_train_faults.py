"""Training survives a killed worker: Ray Train restarts the group from the last checkpoint and finishes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rayembed.config import TrainConfig
from rayembed.model import Embedder
from rayembed.train import train

pytestmark = pytest.mark.usefixtures("ray_local")


def _train_workers() -> list[dict[str, Any]]:
    import ray._private.state as state

    return [
        a
        for a in state.actors().values()
        if a["State"] == "ALIVE" and "RayTrainWorker" in a["ActorClassName"]
    ]


def test_killed_worker_resumes_from_checkpoint(
    tiny_model: Path, snli_triples: Path, tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run is tracked: the restarted group goes on in the same MLflow run, and steps it trains again
    (those after the checkpoint it restarts from) are not logged twice. Its model comes from the registry
    (models:/...@base): the workers, the restarted ones too, and the export fetch it."""
    from mlflow import MlflowClient

    from rayembed.tracking import open_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    base = open_run({"experiment": "bases"}, "base")
    assert base is not None
    base.log_artifacts(str(tiny_model), "model")
    assert base.flush() and base.backend.register("model", "tiny-base", "base", {}) == "1"
    base.close("FINISHED")
    cfg = TrainConfig(
        data=str(snli_triples), output_dir=str(tmp_path / "run"), model="models:/tiny-base@base", num_workers=2,
        zero_stage=2, batch_size=4, epochs=3, max_steps=16, checkpoint_every=2, max_failures=1, lr=1e-3,
        tracking={"uri": mlflow_server, "experiment": "killed-worker"},
    )  # fmt: skip
    result: dict[str, Any] = {}
    job = threading.Thread(target=lambda: result.update(train(cfg)))
    job.start()
    runs = Path(cfg.storage_path or "") / cfg.run_name
    deadline = time.time() + 300
    # Ray Train registers a checkpoint when its controller takes the report from a one-slot queue; a
    # worker writes the next checkpoint's folder before it waits on that queue. So once a third folder
    # has appeared, the second report was queued, hence the first taken: the first is registered.
    seen: set[str] = set()
    while time.time() < deadline and len(seen) < 3:
        seen |= {p.name for p in runs.glob("checkpoint_*") if p.is_dir()}
        time.sleep(0.1)
    workers = _train_workers()
    assert workers, "no training worker found"
    os.kill(workers[0]["Pid"], signal.SIGKILL)
    job.join(timeout=600)
    assert not job.is_alive() and result, "training did not finish after the worker was killed"
    assert result["step"] == 16
    assert result["resumed_from"] >= 2  # the restarted group started from a checkpoint, not from scratch
    steps = [
        h["step"] for h in json.loads(Path(cfg.output_dir, "report", "report.json").read_text())["history"]
    ]
    assert steps == list(range(1, 17))
    exported = Embedder.load(result["output_dir"], device="cpu")  # the registered base, trained
    assert exported.name == f"{Embedder.load(tiny_model, device='cpu').name}-{cfg.run_name}"
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("killed-worker").experiment_id])
    assert [r.info.run_id for r in runs] == [result["tracking"]["run_id"]]
    tracked = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert sorted(tracked) == list(range(1, 17)), tracked  # every step once, the re-trained ones too
    from conftest import record

    record({"faults": {"train_worker_sigkill": {"lost": 16 - len(set(steps)), "duplicated": len(steps) - len(set(steps)),
                                                "resumed_from": result["resumed_from"]}}})  # fmt: skip


def test_a_checkpoint_the_store_refuses_is_not_reported_and_training_goes_on(
    tiny_model: Path, snli_triples: Path, tmp_path: Path, s3_endpoint: str, s3_faults: Any
) -> None:
    """Checkpoints on S3 (the loopback server); every write of step 2's checkpoint is refused (403, as when
    a bucket policy or expired credentials refuse it; the workers retry it 4 times): the run goes on, step 2
    is not reported (a resume would not find it whole), and the run ends at step 4 from its step-4
    checkpoint. Before persist.py, Ray's own upload reported the refused checkpoint as created, with no file
    of it in the store."""
    import s3fs

    from rayembed.train.persist import checkpoint_name

    storage = "s3://rayembed/faults/ckpt"
    cfg = TrainConfig(
        data=str(snli_triples), output_dir=str(tmp_path / "run"), model=str(tiny_model), num_workers=2,
        zero_stage=2, batch_size=4, max_steps=4, checkpoint_every=2, keep_checkpoints=5, lr=1e-3,
        storage_path=storage, s3_endpoint_url=s3_endpoint,
    )  # fmt: skip
    s3_faults.set(share=1.0, path=checkpoint_name(2), status=403)
    result = train(cfg)
    assert s3_faults.failed > 0  # the store did refuse step 2's uploads
    assert result["step"] == 4 and result["checkpoint_failures"] == 1
    assert result["checkpoint"].endswith(checkpoint_name(4))
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    kept = sorted(
        p.rsplit("/", 1)[1] for p in fs.ls(f"rayembed/faults/ckpt/{cfg.run_name}") if "/checkpoint_step" in p
    )
    assert kept == [checkpoint_name(4)], kept  # step 2's partial upload removed
    steps = [
        h["step"]
        for h in json.loads(Path(tmp_path / "run" / "report" / "report.json").read_text())["history"]
    ]
    assert steps == [1, 2, 3, 4]
    from conftest import record

    record({"faults": {"train_checkpoint_upload_refused": {
        "refused_writes": s3_faults.failed, "checkpoint_failures": result["checkpoint_failures"],
        "checkpoints_in_store": kept, "lost": 4 - len(set(steps)), "duplicated": len(steps) - len(set(steps))}}})  # fmt: skip
