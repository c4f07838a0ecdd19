"""Serving in production on a local Ray cluster: a model rollout and rollback under steady load with no
failed request, several models behind one endpoint, and a model that scales to zero."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny, start_endpoint, wait_for
from rayembed.model import Embedder
from rayembed.model.layout import model_revision

pytestmark = pytest.mark.usefixtures("ray_local")
TEXTS = ["rollouts must not drop requests", "two models, one endpoint"]


def _post(url: str, body: dict) -> tuple[int, dict, str | None]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), r.headers.get("x-rayembed-revision")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), None
    except OSError as e:  # a dropped connection counts as a failure too
        return -1, {"error": str(e)}, None


def test_rollout_and_rollback_under_load_drop_no_request(
    tiny_model: Path, tmp_path: Path, s3_endpoint: str
) -> None:
    """Roll out a model from S3 under steady load, then roll back to the local folder."""
    from ray import serve

    from rayembed.io import upload_dir
    from rayembed.serve.config import ServeConfig
    from rayembed.serve.deployment import run

    other = build_tiny(tmp_path / "other", seed=7)  # same name and shape, other weights
    upload_dir(other, "s3://rayembed/models/rollout", s3_endpoint)
    expect = {model_revision(p): Embedder.load(p, device="cpu").encode(TEXTS) for p in (tiny_model, other)}
    url = start_endpoint(model=str(tiny_model), max_replicas=1)
    port = int(url.rsplit(":", 1)[1])
    seen: list[tuple[int, str | None, np.ndarray | None]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, body, revision = _post(f"{url}/v1/embeddings", {"input": TEXTS})
            vectors = np.array([d["embedding"] for d in body["data"]]) if status == 200 else None
            seen.append((status, revision, vectors))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        latest = lambda rev: bool(seen) and seen[-1][1] == rev  # noqa: E731
        assert wait_for(lambda: len(seen) > 10, 60)
        new = ServeConfig(
            model="s3://rayembed/models/rollout", s3_endpoint_url=s3_endpoint, port=port, max_replicas=1
        )
        run(new, blocking=False)  # roll out
        assert wait_for(lambda: latest(model_revision(other)), 120), "the new model never answered"
        rolled = len(seen)
        run(ServeConfig(model=str(tiny_model), port=port, max_replicas=1), blocking=False)  # roll back
        assert wait_for(lambda: latest(model_revision(tiny_model)), 120), "the rollback never answered"
        assert wait_for(lambda: len(seen) > rolled + 10, 60)
    finally:
        stop.set()
        for t in threads:
            t.join()
        serve.shutdown()
    failed = [s for s, _, _ in seen if s != 200]
    assert not failed, f"{len(failed)} of {len(seen)} requests failed: {sorted(set(failed))}"
    assert {r for _, r, _ in seen} == set(expect)  # both models answered, nothing else
    for _, revision, vectors in seen:  # every response's vectors come from exactly the model it names
        np.testing.assert_allclose(vectors, expect[revision], atol=1e-6)


def test_several_models_behind_one_endpoint(
    tiny_model: Path, tiny_decoder: Callable[..., Path], tiny_pair: tuple[Path, Path]
) -> None:
    """Three models, one of them an index-compatible pair (a student and its teacher in the student's
    frame) behind one name, its encoder chosen by `input_type` through the openai client and TEI's route."""
    import openai
    from ray import serve

    decoder, (student, documents) = tiny_decoder("qwen3"), tiny_pair
    url = start_endpoint(models=[{"name": "bert", "model": str(tiny_model)},
                                 {"name": "qwen", "model": str(decoder), "max_replicas": 1, "num_cpus": 0.5},
                                 {"name": "pair", "model": str(student), "document_model": str(documents),
                                  "max_replicas": 1, "num_cpus": 0.5}])  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"bert", "qwen", "pair"}
        for input_type, path in (("document", documents), ("query", student)):
            got = client.embeddings.create(model="pair", input=TEXTS, encoding_format="float",
                                           extra_body={"input_type": input_type})  # fmt: skip
            want = Embedder.load(path, device="cpu").encode(TEXTS)
            np.testing.assert_allclose([d.embedding for d in got.data], want, atol=1e-6)
            status, vectors, revision = _post(
                f"{url}/embed", {"inputs": TEXTS, "model": "pair", "input_type": input_type}
            )
            assert status == 200 and revision == model_revision(path)
            np.testing.assert_allclose(vectors, want, atol=1e-6)
        for name, path in (("bert", tiny_model), ("qwen", decoder)):
            got = client.embeddings.create(model=name, input=TEXTS, encoding_format="float")
            assert got.model == name
            np.testing.assert_allclose(
                [d.embedding for d in got.data], Embedder.load(path, device="cpu").encode(TEXTS), atol=1e-6
            )
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="nope", input="x")
        status, vectors, revision = _post(f"{url}/embed", {"inputs": TEXTS, "model": "qwen"})
        assert status == 200 and revision == model_revision(decoder) and len(vectors[0]) == 64
        deployments = serve.status().applications["rayembed"].deployments
        assert {"EmbeddingService", "Model0-bert", "Model1-qwen"} <= set(deployments)
    finally:
        serve.shutdown()


def test_a_model_scaled_to_zero_serves_the_first_request_after_idle(tiny_model: Path) -> None:
    from ray import serve

    url = start_endpoint(model=str(tiny_model), min_replicas=0, max_replicas=1, upscale_delay_s=0,
                         downscale_delay_s=1, downscale_to_zero_delay_s=1, look_back_period_s=11)  # fmt: skip

    def replicas() -> int:
        deployments = serve.status().applications["rayembed"].deployments
        model = next(d for name, d in deployments.items() if name.startswith("Model0"))
        return int(model.replica_states.get("RUNNING", 0))

    try:
        assert _post(f"{url}/v1/embeddings", {"input": TEXTS})[0] == 200
        assert wait_for(lambda: replicas() == 0, 120), "the idle model did not scale to zero"
        start = time.perf_counter()
        status, body, _ = _post(f"{url}/v1/embeddings", {"input": TEXTS})
        cold = time.perf_counter() - start
        assert status == 200, body
        np.testing.assert_allclose(
            [d["embedding"] for d in body["data"]],
            Embedder.load(tiny_model, device="cpu").encode(TEXTS),
            atol=1e-6,
        )
        print(f"cold start: {cold:.1f} s")
    finally:
        serve.shutdown()
