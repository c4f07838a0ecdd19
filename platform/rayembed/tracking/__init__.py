"""Experiment tracking: one small interface, one module per backend (name -> module in `BACKENDS`).

A job with a `tracking` section opens a run (`open_run`), logs its config as params, step-indexed
metrics and artifacts through a `Tracker`, and ends it. The Tracker never holds the job up: calls go to a
background thread through a bounded queue; a call the backend fails (server down, timeout) is dropped
and counted, with one warning; a full queue drops and counts too. Metrics are buffered and sent in one
request per `interval_s`. `Tracker.close()` waits up to
`flush_timeout_s` for what is queued and returns the counts, which the job puts in its summary.

A backend module has `open(cfg, run_id, run_name, tags) -> Backend`; the Backend has the methods of
`Backend` below. Adding one (TensorBoard, Aim) is one module and one line in `BACKENDS`.
"""

from __future__ import annotations

import importlib
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rayembed.settings import check, one_of

BACKENDS = {"mlflow": "rayembed.tracking.mlflow_backend", "wandb": "rayembed.tracking.wandb_backend"}


@dataclass
class TrackingConfig:
    backend: str = "mlflow"
    """mlflow or wandb."""
    uri: str | None = None
    """Where runs go. mlflow: a tracking URI (http://host:5000, sqlite:///mlflow.db; MLflow 3 refuses a
    folder store); default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db. wandb: the local folder of its files (default ./wandb)."""
    experiment: str = "rayembed"
    """The experiment (mlflow) or project (wandb) the run goes into."""
    run_name: str | None = None
    """The tracked run's name (default: the job's run_name, else the job's name)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Tags set on the run."""
    register_as: str | None = None
    """train (mlflow): register the exported model under this name; a new version each run."""
    alias: str | None = None
    """train (mlflow): point this alias (e.g. 'candidate') at the new version."""
    mode: str = "offline"
    """wandb: offline (files only; `wandb sync` uploads them) or online."""
    timeout_s: float = 10.0
    """Per request to the tracking server; a request that takes longer is dropped and counted."""
    queue_size: int = 10_000
    """Calls waiting for the backend; past this they are dropped and counted (training never waits)."""
    flush_timeout_s: float = 60.0
    """At the end of a job, wait at most this long for queued calls."""
    interval_s: float = 5.0
    """Metrics are buffered and sent in one request at most this often (curves lag by as much)."""

    def __post_init__(self) -> None:
        one_of("tracking.backend", self.backend, BACKENDS)
        one_of("tracking.mode", self.mode, ("offline", "online"))
        check(self.alias is None or self.register_as is not None, "tracking.alias needs tracking.register_as")
        check(self.register_as is None or self.backend == "mlflow", "tracking.register_as needs mlflow")
        check(
            min(self.timeout_s, self.interval_s) > 0 and self.flush_timeout_s >= 0,
            "tracking times must be positive",
        )
        check(self.queue_size >= 1, "tracking.queue_size must be >= 1")


class Backend(Protocol):
    run_id: str

    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, rows: list[tuple[dict[str, float], int | None]]) -> None: ...
    def log_artifacts(self, local_dir: str, artifact_path: str | None) -> None: ...
    def last_step(self, key: str) -> int: ...
    def register(self, artifact_path: str, name: str, alias: str | None, tags: dict[str, str]) -> str: ...
    def end(self, status: str) -> None: ...
    def detach(self) -> None: ...  # this process is done with the run, which another process goes on with


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as flat params: {'eval': {'dims': [64]}} -> {'eval.dims': '[64]'}."""
    out: dict[str, str] = {}
    for k, v in values.items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def numeric(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers in a (nested) summary as flat metrics; strings, lists and None are left out."""
    out: dict[str, float] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out |= numeric(v, f"{prefix}{k}/")
        elif isinstance(v, int | float) and not isinstance(v, bool) and v == v:  # NaN is no metric
            out[f"{prefix}{k}"] = float(v)
    return out


class Tracker:
    """A run of `backend`, logged to from a background thread (see the module's docstring). Metrics are
    buffered and sent together every `interval_s` (one request for many steps: at 10 steps/s a request
    per step cost training 17% of its speed on 2 cores, docs/results/tracking.json)."""

    def __init__(
        self,
        backend: Backend,
        queue_size: int = 10_000,
        flush_timeout_s: float = 60.0,
        interval_s: float = 5.0,
    ) -> None:
        self.backend, self.run_id, self.flush_timeout_s = backend, backend.run_id, flush_timeout_s
        self.interval_s, self.queue_size, self.dropped, self.failed = interval_s, queue_size, 0, 0
        self._pending: list[tuple[dict[str, float], int | None]] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue[Callable[[], Any] | None] = queue.Queue(queue_size)
        self._thread = threading.Thread(target=self._work, name="rayembed-tracking", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            try:
                call = self._queue.get(timeout=self.interval_s)
            except queue.Empty:
                self._run(self._send)  # the metrics of the last interval
                continue
            if call is None:
                return
            self._run(call)

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as e:  # the tracker is down or refused: training goes on
            self.failed += 1
            if self.failed == 1:
                print(f"tracking: a call failed ({type(e).__name__}: {str(e)[:200]}); the job goes on, "
                      "failed calls are dropped and counted", file=sys.stderr)  # fmt: skip

    def _send(self) -> None:
        with self._lock:
            rows, self._pending = self._pending, []
        try:
            if rows:
                self.backend.log_metrics(rows)
        except Exception:
            self.dropped += len(rows)  # values lost with the failed request
            raise

    def _put(self, call: Callable[[], Any] | None, count: bool = True) -> None:
        """Queue a call; a full queue drops it (counted, unless it is the Tracker's own bookkeeping)."""
        try:
            self._queue.put_nowait(call)
        except queue.Full:
            self.dropped += count

    def log_params(self, params: dict[str, str]) -> None:
        self._put(lambda: self.backend.log_params(params))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        with self._lock:
            if len(self._pending) >= self.queue_size:
                self.dropped += 1
            else:
                self._pending.append((metrics, step))

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self._put(self._send, count=False)  # the metrics before it go first
        self._put(lambda: self.backend.log_artifacts(local_dir, artifact_path))

    def flush(self) -> bool:
        """Send the buffered metrics and wait up to flush_timeout_s for every queued call; whether all ran."""
        done = threading.Event()
        self._put(self._send, count=False)
        self._put(done.set, count=False)
        return done.wait(self.flush_timeout_s)

    def close(self, status: str | None = "FINISHED") -> dict[str, Any]:
        """Flush, end the run with `status` (None: leave it running for another process to go on with),
        stop the thread; the counts for the job's summary."""
        flushed = self.flush()
        if flushed:
            self._put(self.backend.detach if status is None else lambda: self.backend.end(status))
            flushed = self.flush()
        self._put(None, count=False)  # the thread ends (a stuck one is a daemon: it dies with the job)
        if not flushed:
            with self._lock:
                self.dropped += self._queue.qsize() + len(self._pending)
        return {"run_id": self.run_id, "dropped": self.dropped, "failed": self.failed}


def backend_module(name: str) -> Any:
    return importlib.import_module(BACKENDS[name])


def open_run(
    cfg: TrackingConfig | dict[str, Any],
    run_name: str,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> Tracker | None:
    """A Tracker on a new run (or on `run_id`, resumed). None, with a warning, if the backend cannot be
    reached: the job runs untracked rather than not at all."""
    cfg = cfg if isinstance(cfg, TrackingConfig) else TrackingConfig(**cfg)
    try:
        backend = backend_module(cfg.backend).open(
            cfg, run_id, cfg.run_name or run_name, {**cfg.tags, **(tags or {})}
        )
    except Exception as e:
        print(f"tracking: cannot open a {cfg.backend} run at {cfg.uri or 'the default store'} "
              f"({type(e).__name__}: {str(e)[:200]}); this job runs untracked", file=sys.stderr)  # fmt: skip
        return None
    return Tracker(backend, cfg.queue_size, cfg.flush_timeout_s, cfg.interval_s)


def source_tags(model: str, trained_in: dict[str, str] | None = None) -> dict[str, str]:
    """Tags linking a job to the run that made its model: a registered version's run, or `trained_in`,
    the run a folder's rayembed.json names (model.layout.trained_in)."""
    if not model.startswith("models:/"):
        run_id = (trained_in or {}).get("run_id")
        return {"rayembed.model": model} | ({"rayembed.model_run_id": run_id} if run_id else {})
    from rayembed.tracking.mlflow_backend import registered

    version = registered(model)
    return {
        "rayembed.model": f"models:/{version.name}/{version.version}",
        "rayembed.model_run_id": version.run_id or "",
    }


def log_job(
    cfg: TrackingConfig | dict[str, Any],
    job: str,
    params: dict[str, Any],
    metrics: dict[str, Any],
    model: str = "",
    trained_in: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One tracked run for a job that has no steps (embed, eval): its settings as params, the numbers of
    its summary as metrics, linked to the model's run (`trained_in`: a folder's, see `source_tags`);
    returns the Tracker's counts (or why it has none)."""
    try:
        tags = {"rayembed.job": job, **source_tags(model, trained_in)}
    except Exception as e:  # noqa: BLE001  # the registry is down: the run goes untagged
        tags = {"rayembed.job": job, "rayembed.model": model}
        print(f"tracking: cannot read {model}'s registry entry ({type(e).__name__}); the run is not linked")
    tracker = open_run(cfg, job, tags=tags)
    if tracker is None:
        return {"error": "the tracking store could not be reached; see the job's log"}
    tracker.log_params(flatten(params))
    tracker.log_metrics(numeric(metrics))
    return tracker.close()


def registry_env(*models: str | None) -> dict[str, str]:
    """The driver's MLflow settings, for the runtime env of workers and replicas that fetch one of
    `models` from the registry (the tracking URI as the driver resolves it: a default SQLite file by its
    absolute path); {} when none is a models:/ source (an unchanged runtime env reuses Ray's workers)."""
    import os

    if not any(str(m or "").startswith("models:/") for m in models):
        return {}
    from rayembed.tracking.mlflow_backend import tracking_uri

    names = ("MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_S3_ENDPOINT_URL")
    return {"MLFLOW_TRACKING_URI": tracking_uri()} | {k: os.environ[k] for k in names if os.environ.get(k)}
