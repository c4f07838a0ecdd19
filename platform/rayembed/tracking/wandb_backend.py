"""Weights & Biases: runs (config, step-indexed metrics, artifacts) in `mode` offline (files under `uri`,
uploaded later by `wandb sync`) or online. A resumed job passes its run id back (`resume="allow"`); W&B
keeps a run's steps increasing itself. Registration is MLflow's (TrackingConfig refuses it here)."""

from __future__ import annotations

import os
from typing import Any


class WandbRun:
    """One W&B run (the `Backend` interface of rayembed.tracking)."""

    def __init__(self, run: Any) -> None:
        self.run, self.run_id = run, str(run.id)

    def log_params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, rows: list[tuple[dict[str, float], int | None]]) -> None:
        for metrics, step in rows:
            if step is not None and step < self.run.step:  # W&B refuses going back; a resumed job's repeat
                continue
            self.run.log(metrics, step=step)

    def log_artifacts(self, local_dir: str, artifact_path: str | None) -> None:
        import wandb

        name = (artifact_path or "files").replace("/", "-")
        artifact = wandb.Artifact(
            f"{self.run_id}-{name}", type="model" if name.startswith("model") else "run-files"
        )
        artifact.add_dir(local_dir)
        self.run.log_artifact(artifact)

    def last_step(self, key: str) -> int:
        return int(self.run.step) - 1

    def register(self, artifact_path: str, name: str, alias: str | None, tags: dict[str, str]) -> str:
        raise NotImplementedError("registering models is MLflow's here (tracking.backend=mlflow)")

    def end(self, status: str) -> None:
        self._finish(0 if status == "FINISHED" else 1)

    def detach(self) -> None:
        """Finish this process's part of the run: W&B writes what it holds only then (a Ray worker that
        exits without it lost rank 0's every step), and the next process resumes the run by its id."""
        self._finish(0)

    def _finish(self, exit_code: int) -> None:
        """End the run and, if no other run of this process is open, stop W&B's service: `finish()` only
        tells the service the run is over, and the service writes the run's log (offline) after it returns
        (1 read in 30 right after it found the bare 7-byte header); stopped, it has written and uploaded
        all. Its atexit hook would do the same, but a Ray worker may not run it."""
        import wandb

        self.run.finish(exit_code=exit_code)
        if wandb.setup().most_recent_active_run is None:
            wandb.teardown()


def open(cfg: Any, run_id: str | None, run_name: str, tags: dict[str, str]) -> WandbRun:  # noqa: A001
    import wandb

    folder = cfg.uri or os.environ.get("WANDB_DIR") or "./wandb"
    os.makedirs(folder, exist_ok=True)
    run = wandb.init(project=cfg.experiment, name=run_name, id=run_id, resume="allow" if run_id else None,
                     dir=folder, mode=cfg.mode, tags=[f"{k}={v}" for k, v in tags.items()],
                     settings=wandb.Settings(silent=True, console="off"))  # fmt: skip
    return WandbRun(run)
