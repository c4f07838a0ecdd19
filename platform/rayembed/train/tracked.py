"""The train job's tracked run (rayembed.tracking): one run per `run_name`, whatever restarts it.

The driver opens the run and logs the resolved config as params; its id is kept with the checkpoints
(`<storage_path>/<run_name>.tracking.json`), so a resumed job (a new `rayembed train` of the same run)
appends to it, as does Ray Train's own restart after a lost worker or node (the id rides in the workers'
config). Rank 0 logs each step's metrics, only past the last step the run already has, so no step is
logged twice when a run resumes from a checkpoint older than its last logged step; steps up to the
checkpoint that the run lacks (queued when rank 0 died) are logged from the checkpoint's history. The export task logs
the eval, the report and the model, registers the model if asked, and ends the run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from rayembed.io import filesystem, strip_scheme
from rayembed.tracking import Tracker, TrackingConfig, flatten, numeric, open_run
from rayembed.train.config import TrainConfig


def resolved(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its tracking store named where every process finds it: the default or a relative
    store made absolute (workers and the export task run in their own folders)."""
    from rayembed.tracking.mlflow_backend import tracking_uri

    if not cfg.tracking:
        return cfg
    t = TrackingConfig(**cfg.tracking)
    uri = tracking_uri(t.uri) if t.backend == "mlflow" else str(Path(t.uri or "wandb").resolve())
    return dataclasses.replace(cfg, tracking=dataclasses.asdict(dataclasses.replace(t, uri=uri)))


def _kept(cfg: TrainConfig) -> tuple[Any, str]:
    fs = filesystem(str(cfg.storage_path), cfg.s3_endpoint_url) or pafs.LocalFileSystem()
    return fs, f"{strip_scheme(str(cfg.storage_path)).rstrip('/')}/{cfg.run_name}.tracking.json"


def kept_run_id(cfg: TrainConfig) -> str | None:
    fs, path = _kept(cfg)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read()).get("run_id")


def start(cfg: TrainConfig) -> Tracker | None:
    """Open (or reopen) the run on the driver, keep its id with the checkpoints, log the config
    (`cfg` as `resolved` returns it)."""
    if not cfg.tracking:
        return None
    t = TrackingConfig(**cfg.tracking)
    kept = kept_run_id(cfg)
    tracker = open_run(
        t, cfg.run_name, kept, tags={"rayembed.job": "train", "rayembed.run_name": cfg.run_name}
    )
    if tracker is None:
        return None
    if tracker.run_id != kept:
        fs, path = _kept(cfg)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps({"run_id": tracker.run_id, "backend": t.backend, "uri": t.uri}).encode())
    tracker.log_params(flatten(dataclasses.asdict(cfg)))
    return tracker


def for_worker(cfg: TrainConfig, run_id: str | None) -> tuple[Tracker | None, int]:
    """Rank 0's tracker on the run and the last step the run has logged (-1: none)."""
    if not cfg.tracking or not run_id:
        return None, -1
    tracker = open_run(cfg.tracking, cfg.run_name, run_id)
    if tracker is None:
        return None, -1
    try:
        return tracker, tracker.backend.last_step("loss")
    except Exception as e:  # noqa: BLE001  # an unreachable store: log everything, it dedups nothing
        print(f"tracking: cannot read the run's last step ({type(e).__name__}); logging from here")
        return tracker, -1


def backfill(tracker: Tracker | None, history: list[dict[str, Any]], logged: int) -> int:
    """Log the steps of a resumed checkpoint's history that the run lacks (rank 0 died with them still
    queued), so the run has every step up to where training goes on; returns the last step logged."""
    if tracker is None:
        return logged
    for h in history:
        if h["step"] > logged:
            skip = ("step", "time_s", "epoch", "row", "rows", "workers")
            tracker.log_metrics(numeric({k: v for k, v in h.items() if k not in skip}), h["step"])
    return max([logged, *(h["step"] for h in history)])


def step_metrics(
    metrics: dict[str, float], terms: dict[str, Any], lr: float, took: tuple[int, int, float]
) -> dict[str, float]:
    """What rank 0 logs at a step: the loss, each of its terms' unweighted values (`loss/<term>`, rank
    0's rows, 0-d tensors read here), lr, memory and speeds from `took` = (rows of the global batch, tokens rank 0's model
    read, seconds): samples/s and rank 0's tokens/s."""
    rows, tokens, seconds = took
    speed = {"samples_per_s": rows / seconds, "tokens_per_s_per_worker": tokens / seconds}
    return {**numeric(metrics), **{f"loss/{k}": float(v) for k, v in terms.items()}, "lr": lr, **speed}


def finish(cfg: TrainConfig, summary: dict[str, Any], evals: dict[str, Any] | None) -> Tracker | None:
    """The export's tracker on the run, with the summary and eval logged (None if untracked)."""
    run_id = (summary.get("tracking") or {}).get("run_id")
    if not cfg.tracking or not run_id:
        return None
    tracker = open_run(cfg.tracking, cfg.run_name, run_id)
    if tracker is not None:
        tracker.log_metrics({f"run/{k}": v for k, v in numeric(summary).items()})
        if evals:
            tracker.log_metrics({f"eval/{k}": v for k, v in numeric(evals).items()})
    return tracker


def register(cfg: TrainConfig, tracker: Tracker, artifact: str, tags: dict[str, str]) -> dict[str, Any]:
    """Register the model logged as `artifact` if `register_as` says so: {'name', 'version', 'alias'} or
    the error."""
    t = TrackingConfig(**(cfg.tracking or {}))
    if not t.register_as:
        return {}
    if not tracker.flush():  # the model's files must be there first
        return {"error": "the model's upload did not finish in tracking.flush_timeout_s"}
    try:
        version = tracker.backend.register(artifact, t.register_as, t.alias, tags)
    except Exception as e:  # noqa: BLE001  # the model is published anyway; the summary says what failed
        print(f"tracking: registering {t.register_as!r} failed: {type(e).__name__}: {str(e)[:200]}")
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return {
        "name": t.register_as,
        "version": version,
        "alias": t.alias,
        "uri": f"models:/{t.register_as}/{version}",
    }
