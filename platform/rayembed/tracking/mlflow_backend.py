"""MLflow: runs (params, step-indexed metrics, artifacts), the model registry, and `models:/` sources.

The tracking URI is the section's `uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (a SQLite
file in the working folder, MLflow 3's own default; its file store is frozen); the registry is the same
store unless $MLFLOW_REGISTRY_URI says otherwise. Requests time out after `timeout_s` and are tried
twice at most ($MLFLOW_HTTP_REQUEST_TIMEOUT and $MLFLOW_HTTP_REQUEST_MAX_RETRIES, unless set): MLflow's
own default of 7 retries with backoff would hold a failing call for minutes.

`models:/<name>/<version>` and `models:/<name>@<alias>` name a registered version: `registered(uri)`
resolves an alias to its version, `download(version, dest)` copies the version's files.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

MAX_PARAMS, MAX_METRICS, MAX_PARAM_CHARS = 100, 1000, 6000  # MLflow's limits per log_batch and value


def tracking_uri(uri: str | None = None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else the SQLite default; a relative SQLite path made absolute
    (Ray workers run in their own folders, and must open the file the driver opened)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    return uri


def client(uri: str | None = None, timeout_s: float = 10.0) -> Any:
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    tracking = tracking_uri(uri)
    return MlflowClient(tracking, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking)


def _chunks(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


class MlflowRun:
    """One MLflow run (the `Backend` interface of rayembed.tracking)."""

    def __init__(self, mlflow_client: Any, run_id: str) -> None:
        self.client, self.run_id = mlflow_client, run_id

    def log_params(self, params: dict[str, str]) -> None:
        """New params are logged; a resumed run's changed ones (MLflow refuses to change a param) become
        tags `rayembed.resumed_with.<key>`."""
        from mlflow.entities import Param, RunTag

        have = self.client.get_run(self.run_id).data.params
        values = {k: v[:MAX_PARAM_CHARS] for k, v in params.items()}
        new = [Param(k, v) for k, v in values.items() if k not in have]
        changed = [
            RunTag(f"rayembed.resumed_with.{k}", v) for k, v in values.items() if k in have and have[k] != v
        ]
        for chunk in _chunks(new, MAX_PARAMS):
            self.client.log_batch(self.run_id, params=chunk)
        if changed:
            self.client.log_batch(self.run_id, tags=changed)

    def log_metrics(self, rows: list[tuple[dict[str, float], int | None]]) -> None:
        """Several steps' metrics in as few requests as MLflow allows (1,000 values each)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(_key(k), float(v), now, step or 0) for metrics, step in rows for k, v in metrics.items()
        ]
        for chunk in _chunks(batch, MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifacts(self, local_dir: str, artifact_path: str | None) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def last_step(self, key: str) -> int:
        """The last step logged for `key` (-1 if none): a resumed run logs only the steps after it."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, _key(key))), default=-1)

    def register(self, artifact_path: str, name: str, alias: str | None, tags: dict[str, str]) -> str:
        """A new version of registered model `name` from this run's `artifact_path`; returns it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"runs:/{self.run_id}/{artifact_path}"
        version = self.client.create_model_version(name, source, run_id=self.run_id, tags=tags)
        if alias:
            self.client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

    def detach(self) -> None:
        """Nothing to do: every call was a request the server has answered."""


def _key(name: str) -> str:
    """MLflow's metric names allow letters, digits, _ - . / and spaces."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def open(cfg: Any, run_id: str | None, run_name: str, tags: dict[str, str]) -> MlflowRun:  # noqa: A001
    """A new run in `cfg.experiment`, or `run_id` set running again (a resumed job)."""
    from mlflow.exceptions import MlflowException

    c = client(cfg.uri, cfg.timeout_s)
    if run_id:
        c.get_run(run_id)  # a run id kept from an earlier start that this store lacks fails here
        c.update_run(run_id, status="RUNNING")
        return MlflowRun(c, run_id)
    experiment = c.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        try:
            experiment_id = c.create_experiment(cfg.experiment)
        except MlflowException:  # another job created it meanwhile
            experiment_id = c.get_experiment_by_name(cfg.experiment).experiment_id
    else:
        experiment_id = experiment.experiment_id
    return MlflowRun(c, c.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id)


URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w\-]+))$")


def registered(uri: str) -> Any:
    """The registered ModelVersion that `models:/<name>/<version>` or `models:/<name>@<alias>` names."""
    m = URI.match(uri)
    if m is None:
        raise ValueError(f"model {uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    c = client()
    if m["alias"]:
        return c.get_model_version_by_alias(m["name"], m["alias"])
    return c.get_model_version(m["name"], m["version"])


def download(version: Any, dest: str) -> str:
    """Copy a registered version's files into the folder `dest`; returns the model folder in it."""
    import mlflow.artifacts

    c = client()
    source = c.get_model_version_download_uri(version.name, version.version)
    return str(
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dest, tracking_uri=tracking_uri())
    )
