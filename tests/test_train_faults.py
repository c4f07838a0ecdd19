"""Training survives a killed worker: Ray Train restarts the group from the last checkpoint and finishes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rayembed.config import TrainConfig
from rayembed.train import train

pytestmark = pytest.mark.usefixtures("ray_local")


def _train_workers() -> list[dict[str, Any]]:
    import ray._private.state as state

    return [
        a
        for a in state.actors().values()
        if a["State"] == "ALIVE" and "RayTrainWorker" in a["ActorClassName"]
    ]


def test_killed_worker_resumes_from_checkpoint(tiny_model: Path, snli_triples: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        data=str(snli_triples), output_dir=str(tmp_path / "run"), model=str(tiny_model), num_workers=2,
        zero_stage=2, batch_size=4, epochs=3, max_steps=16, checkpoint_every=2, max_failures=1, lr=1e-3,
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
