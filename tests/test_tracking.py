"""Experiment tracking and the model registry against a real `mlflow server` on loopback (SQLite store,
proxied artifacts): a tracked 2-worker ZeRO-2 run and its resume are one run; its model is registered,
then served, evaluated and batch-embedded from `models:/`; a store that is down holds no job up; W&B
offline through the same interface."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import DATA, free_port, start_endpoint, start_mlflow_server, wait_for
from rayembed.config import EmbedConfig, EvalConfig, ServeConfig, TrainConfig
from rayembed.model import Embedder, resolve_model_path
from rayembed.model.layout import model_revision, trained_in
from rayembed.tracking import Tracker, TrackingConfig, open_run

pytestmark = pytest.mark.usefixtures("ray_local")

EVAL = {"beir_dir": str(DATA / "scifact"), "max_queries": 5, "max_docs": 30, "sts_file": None}


def _runs(client: Any, experiment: str) -> list[Any]:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def _steps(client: Any, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_a_tracked_run_resumes_as_one_run_and_its_registered_model_is_served(
    mlflow_server: str, tiny_model: Path, snli_triples: Path, scifact_docs: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from mlflow import MlflowClient
    from ray import serve

    from rayembed.embed import embed
    from rayembed.eval import evaluate
    from rayembed.serve import run as deploy
    from rayembed.train import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    tracking = {"experiment": "tracked-train", "register_as": "tiny-tracked", "alias": "candidate"}

    def cfg(max_steps: int) -> TrainConfig:
        return TrainConfig(
            data=str(snli_triples), output_dir=str(tmp_path / "run"), model=str(tiny_model), num_workers=2,
            zero_stage=2, batch_size=8, max_length=32, lr=1e-3, max_steps=max_steps, checkpoint_every=2,
            matryoshka_dims=[16], eval=EVAL, tracking=tracking,
        )  # fmt: skip

    first = train(cfg(2))
    run_id = first["tracking"]["run_id"]
    assert first["tracking"]["dropped"] == first["tracking"]["failed"] == 0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["zero_stage"] == "2"
    assert run.data.params["num_workers"] == "2" and run.data.params["eval.max_queries"] == "5"
    assert _steps(client, run_id) == [1, 2] and _steps(client, run_id, "lr") == [1, 2]
    assert "samples_per_s" in run.data.metrics and "peak_mem_mb" in run.data.metrics
    assert _steps(client, run_id, "loss/infonce_16") == [1, 2]  # the loss's one term: width 16
    assert run.data.metrics["tokens_per_s_per_worker"] > run.data.metrics["samples_per_s"] / 2  # > 1 a row
    assert "eval/after/beir/32/ndcg_10" in run.data.metrics  # the export's eval, before and after
    assert {"model/step-2/config.json", "model/step-2/int8_scales.json"} <= {
        a.path for a in client.list_artifacts(run_id, "model/step-2")
    }
    assert {"report/report.md", "report/curves.png"} <= {
        a.path for a in client.list_artifacts(run_id, "report")
    }
    assert first["tracking"]["registered"]["version"] == "1"

    second = train(cfg(4))  # the same run_name again: resumes from step 2, into the same tracked run
    assert second["resumed_from"] == 2 and second["tracking"]["run_id"] == run_id
    assert [r.info.run_id for r in _runs(client, "tracked-train")] == [run_id]
    assert _steps(client, run_id) == [1, 2, 3, 4]  # each step once
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/step-2", "model/step-4"]
    version = client.get_model_version_by_alias("tiny-tracked", "candidate")
    assert version.version == "2" and version.run_id == run_id
    assert version.tags["rayembed.width"] == "32" and version.tags["rayembed.matryoshka_dims"] == "16"
    assert version.tags["rayembed.revision"] == model_revision(Path(second["output_dir"]))
    assert "rayembed.frame" not in version.tags  # not rotated (test_registered_tags_name_a_rotated_frame)

    # models:/ wherever a model path goes: the endpoint names the registry version as its revision
    url = start_endpoint(model="models:/tiny-tracked@candidate", model_name="tiny")
    try:
        served, revision = _served(url)
        assert revision == "models:/tiny-tracked/2"
        local = Embedder.load(second["output_dir"], device="cpu").encode(["a registered model"])[0]
        assert np.allclose(served, local, atol=1e-5)
        # the alias moved back to version 1: a replica started now (one lost, or added by autoscaling) serves
        # the version deployed, not the alias's new one (it did: one endpoint, two models); deploying the
        # same settings again is the rollout to version 1
        client.set_registered_model_alias("tiny-tracked", "candidate", "1")
        [replica] = _replicas("EmbeddingService")
        os.kill(replica["Pid"], signal.SIGKILL)
        assert wait_for(lambda: _replicas("EmbeddingService") and _answers(url), 120)
        assert _replicas("EmbeddingService")[0]["Pid"] != replica["Pid"]
        again, revision = _served(url)
        assert revision == "models:/tiny-tracked/2" and np.allclose(again, served, atol=1e-6)
        deploy(ServeConfig(port=int(url.rsplit(":", 1)[1]), model="models:/tiny-tracked@candidate", model_name="tiny"),
            blocking=False)  # fmt: skip
        assert wait_for(lambda: _served(url)[1] == "models:/tiny-tracked/1", 120), _served(url)[1]
        v1 = Embedder.load(resolve_model_path("models:/tiny-tracked/1"), device="cpu")
        want = v1.encode(["a registered model"])[0]
        assert np.allclose(_served(url)[0], want, atol=1e-5) and not np.allclose(want, served, atol=1e-4)
    finally:
        serve.shutdown()
        client.set_registered_model_alias("tiny-tracked", "candidate", "2")

    # merge takes registered versions as ingredients: the soup of versions 1 and 2
    from rayembed.config import MergeConfig
    from rayembed.train.merge import merge

    soup = merge(MergeConfig(models=["models:/tiny-tracked/1", "models:/tiny-tracked@candidate"],
                             output=str(tmp_path / "soup")))  # fmt: skip
    assert Embedder.load(soup["output"], device="cpu").dim == 32

    # eval and embed of the registered model log into their experiments, linked to the training run
    report = evaluate(EvalConfig(model="models:/tiny-tracked/2", **EVAL, tracking={"experiment": "evals"}))
    [evaluated] = _runs(client, "evals")
    assert evaluated.data.tags["rayembed.model_run_id"] == run_id
    # the exported folder names its training run too (rayembed.json): an eval of the folder links to it;
    # a model saved again from it (fine-tuned, merged) does not
    assert trained_in(Path(second["output_dir"])) == {"backend": "mlflow", "run_id": run_id}
    assert trained_in(Embedder.load(second["output_dir"], device="cpu").save(tmp_path / "again")) == {}
    evaluate(EvalConfig(model=second["output_dir"], **EVAL, tracking={"experiment": "folder-evals"}))
    [folder_eval] = _runs(client, "folder-evals")
    assert folder_eval.data.tags["rayembed.model_run_id"] == run_id
    assert evaluated.data.metrics["beir/32/ndcg_10"] == pytest.approx(report["beir"]["32"]["ndcg@10"])
    summary = embed(EmbedConfig(input=str(scifact_docs), output=str(tmp_path / "vectors"), text_column="text", id_column="_id",
                                model="models:/tiny-tracked@candidate", progress=False, tracking={"experiment": "embeds"}))  # fmt: skip
    [embedded] = _runs(client, "embeds")
    assert embedded.data.tags["rayembed.model"] == "models:/tiny-tracked/2"
    assert (
        embedded.data.metrics["rows"] == summary["rows"] == 300 and "padding_ratio" in embedded.data.metrics
    )


def _replicas(kind: str) -> list[dict[str, Any]]:
    import ray._private.state as state

    return [a for a in state.actors().values() if a["State"] == "ALIVE" and kind in a["ActorClassName"]]


def _answers(url: str) -> bool:
    try:
        return bool(_served(url))
    except OSError:
        return False


def _served(url: str) -> tuple[list[float], str]:
    """The endpoint's vector of one text and the revision it names."""
    body = json.dumps({"input": ["a registered model"], "model": "tiny"}).encode()
    req = urllib.request.Request(f"{url}/v1/embeddings", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["data"][0]["embedding"], r.headers["x-rayembed-revision"]


class Blocked:
    """A backend whose every call waits for `go` (a store that hangs)."""

    run_id = "blocked"

    def __init__(self) -> None:
        self.go, self.entered, self.logged = threading.Event(), threading.Event(), 0

    def log_params(self, params: dict[str, str]) -> None:
        self.entered.set()
        self.go.wait()
        self.logged += 1

    def log_metrics(self, rows: list[tuple[dict[str, float], int | None]]) -> None:
        self.go.wait()
        self.logged += len(rows)

    def end(self, status: str) -> None:
        self.go.wait()

    def detach(self) -> None:
        self.go.wait()


def test_a_hung_or_absent_store_holds_no_job_up(tiny_model: Path) -> None:
    """(A store lost mid-run: the S3 test below stops its server.)"""
    # hung: calls return while the backend is stuck on the first; past the queue they are dropped, counted
    backend = Blocked()
    tracker = Tracker(backend, queue_size=4, flush_timeout_s=0.5)  # type: ignore[arg-type]
    for step in range(10):  # buffered: past queue_size steps, dropped and counted
        tracker.log_metrics({"loss": 1.0}, step)
    assert tracker.dropped == 6
    tracker.log_params({"a": "1"})
    assert backend.entered.wait(10)  # the backend is stuck on this call: 4 more are queued, 5 dropped
    for _ in range(9):
        tracker.log_params({"a": "1"})
    assert backend.logged == 0 and tracker.dropped == 6 + 5
    counts = tracker.close()
    backend.go.set()
    assert counts["dropped"] == 6 + 5 + 4 + 4  # what the store never took: queued calls, buffered steps

    # never there: the job runs untracked and says so
    report_cfg = EvalConfig(
        model=str(tiny_model), **EVAL, tracking={"uri": f"http://127.0.0.1:{free_port()}"}
    )
    from rayembed.eval import evaluate

    report = evaluate(report_cfg)
    assert "error" in report["tracking"] and report["beir"]["queries"] == 5 and "32" in report["beir"]


def test_wandb_offline_through_the_same_interface(tmp_path: Path) -> None:
    tracker = open_run({"backend": "wandb", "uri": str(tmp_path / "wandb"), "experiment": "offline"}, "w")
    assert tracker is not None
    tracker.log_params({"lr": "0.001"})
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step}, step)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    tracker.log_artifacts(str(model), "model")
    counts = tracker.close()
    assert counts["failed"] == counts["dropped"] == 0
    # offline, a run is one protobuf log for `wandb sync` (no reader ships with wandb 0.31): its records
    # hold the param's and each step's values as they were sent, on disk once close() returns (before the
    # backend stopped W&B's service, 1 read in 30 right after close found only the log's header)
    [log] = (tmp_path / "wandb" / "wandb").glob(
        f"offline-run-*-{counts['run_id']}/run-{counts['run_id']}.wandb"
    )
    data = log.read_bytes()
    assert b"0.001" in data and all(repr(1.0 / step).encode() in data for step in (1, 2, 3))
    assert f"{counts['run_id']}-model".encode() in data  # the model folder's artifact


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"backend": "neptune"}, "tracking.backend must be one of mlflow, wandb"),
        ({"alias": "candidate"}, "tracking.alias needs tracking.register_as"),
        ({"backend": "wandb", "register_as": "m"}, "tracking.register_as needs mlflow"),
        ({"experiments": "x"}, "unknown setting(s) ['experiments']"),
    ],
)
def test_bad_tracking_settings_are_refused_before_any_work(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        TrainConfig(data="x", output_dir="y", tracking=settings)
    assert TrackingConfig().backend == "mlflow"


def test_rank_0_restarted_logs_the_checkpointed_steps_its_run_lacks(mlflow_server: str) -> None:
    """Rank 0 died with steps 2-3 still queued; the restart from the step-3 checkpoint logs them from the
    checkpoint's history (loss and the loss's own metrics, not its bookkeeping) and goes on after 3."""
    from mlflow import MlflowClient

    from rayembed.train.tracked import backfill

    tracker = open_run({"uri": mlflow_server, "experiment": "backfill"}, "restarted")
    assert tracker is not None
    tracker.log_metrics({"loss": 1.0}, 1)
    assert tracker.flush()
    history = [{"step": s, "loss": 1.0 / s, "time_s": 0.1 * s, "epoch": 0, "row": 8 * s, "rows": 8, "workers": 2,
                "scale": 20.0} for s in (1, 2, 3)]  # fmt: skip
    assert backfill(tracker, history, tracker.backend.last_step("loss")) == 3
    tracker.close()
    client = MlflowClient(mlflow_server)
    assert _steps(client, tracker.run_id) == [1, 2, 3] and _steps(client, tracker.run_id, "scale") == [2, 3]
    assert client.get_metric_history(tracker.run_id, "loss")[0].value == 1.0  # step 1 as first logged
    assert "time_s" not in client.get_run(tracker.run_id).data.metrics


def test_a_model_registered_with_its_artifacts_on_s3_is_fetched_and_a_lost_server_holds_nothing_up(
    s3_endpoint: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tracking server whose artifact store is the loopback S3 server: the model folder logged through
    it lands on S3, its registered version resolves by alias and loads as the model that was logged. Then
    the server is stopped under a run."""
    import s3fs

    from rayembed.model import resolve_model_path

    proc, uri = start_mlflow_server(tmp_path / "server", artifacts="s3://rayembed/mlflow",
                                    env={"MLFLOW_S3_ENDPOINT_URL": s3_endpoint})  # fmt: skip
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("RAYEMBED_MODEL_CACHE", str(tmp_path / "cache"))
        tracker = open_run({"experiment": "on-s3", "register_as": "tiny-s3", "alias": "prod"}, "s3")
        assert tracker is not None
        tracker.log_artifacts(str(tiny_model), "model")
        assert tracker.flush()
        assert tracker.backend.register("model", "tiny-s3", "prod", {}) == "1"
        tracker.close()
        stored = s3fs.S3FileSystem(endpoint_url=s3_endpoint).find("rayembed/mlflow")
        assert any(f.endswith("/artifacts/model/model.safetensors") for f in stored), stored
        local = resolve_model_path("models:/tiny-s3@prod")
        assert local.parent == tmp_path / "cache"  # the node's model cache, keyed by registry and version
        text = ["a model from the registry"]
        want = Embedder.load(tiny_model, device="cpu").encode(text)
        assert np.allclose(Embedder.load(local, device="cpu").encode(text), want, atol=1e-6)

        # lost: the server goes away mid-run; its calls fail, are counted, and the job's end still comes
        tracker = open_run({"experiment": "on-s3"}, "lost")
        assert tracker is not None
        tracker.log_metrics({"loss": 1.0}, 1)
        assert tracker.flush()
        proc.terminate()
        proc.wait(30)
        for step in range(2, 6):
            tracker.log_metrics({"loss": 1.0}, step)
        counts = tracker.close()  # the 4 steps go in one request, which fails: its values are dropped
        assert counts["failed"] >= 1 and counts["dropped"] == 4
    finally:
        proc.terminate()
        proc.wait(30)


def test_registered_tags_name_a_rotated_models_frame_and_its_revision(tiny_model: Path) -> None:
    """A pca-rotated model (distillation's export) is registered with its output frame, the id merge and
    the index-compatible pair compare, and the revision its folder has wherever it was published."""
    from rayembed.train.export import model_tags

    model = Embedder.load(tiny_model, device="cpu")
    cfg = TrainConfig(data="x", output_dir="s3://bucket/out", matryoshka_dims=[16], run_name="r")
    assert "rayembed.frame" not in model_tags(cfg, model, "abc")
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((model.dim, model.dim)))
    tags = model_tags(cfg, model.rotate(q), "abc")
    assert tags["rayembed.frame"] == model.frame and len(model.frame or "") >= 8
    assert tags["rayembed.revision"] == "abc" and tags["rayembed.run_name"] == "r"
