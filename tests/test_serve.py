"""Serve job: Ray Serve + OpenAI-compatible /v1/embeddings, called with the real `openai` client."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from rayembed.model import Embedder

TEXTS = ["The quick brown fox.", "Embeddings map text to vectors.", "Ray Serve batches requests."]


KEY = "sk-test-123"


@pytest.fixture(scope="module")
def endpoint(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import ray
    from ray import serve

    from conftest import start_endpoint

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    keys = tmp_path_factory.mktemp("auth") / "api-keys"
    keys.write_text(f"# rayembed keys\n{KEY}\n")
    url = start_endpoint(
        model=str(tiny_model), max_inputs_per_request=8, max_body_bytes=4096,
        truncate=False, api_keys_file=str(keys), max_queued_inputs=64,
    )  # fmt: skip
    yield url
    serve.shutdown()


def _post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_client_matches_encode(endpoint: str, tiny_model: Path) -> None:
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key=KEY)
    local = Embedder.load(tiny_model, device="cpu")
    resp = client.embeddings.create(model="tiny-bert", input=TEXTS, encoding_format="float")
    assert [d.index for d in resp.data] == [0, 1, 2] and resp.model == "tiny-bert"
    np.testing.assert_allclose(np.array([d.embedding for d in resp.data]), local.encode(TEXTS), atol=1e-5)
    assert resp.usage.prompt_tokens == sum(len(x) for x in local.tokenizer(TEXTS)["input_ids"])
    # The client's default is base64; it decodes to the same floats. A single string works too.
    one = client.embeddings.create(model="tiny-bert", input=TEXTS[1], dimensions=16)
    np.testing.assert_allclose(one.data[0].embedding, local.encode([TEXTS[1]], dim=16)[0], atol=1e-5)
    assert client.models.list().data[0].id == "tiny-bert"


def test_chunked_output_of_a_long_input_through_the_openai_client(endpoint: str, tiny_model: Path) -> None:
    from rayembed.model.chunking import encode_chunks

    long = " ".join(TEXTS * 12)
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key=KEY)
    resp = client.embeddings.create(model="tiny-bert", input=[long, TEXTS[0]], encoding_format="float",
                                    extra_body={"chunking": {"mode": "chunks", "chunk_tokens": 24}})  # fmt: skip
    p, want, _ = encode_chunks(Embedder.load(tiny_model, device="cpu"), [long, TEXTS[0]], "chunks", 24)
    np.testing.assert_allclose(np.array([d.embedding for d in resp.data]), want, atol=1e-5)
    extra = [d.model_extra or {} for d in resp.data]
    assert [d.index for d in resp.data] == p.doc and [x["chunk"] for x in extra] == p.index
    assert [x["start"] for x in extra] == p.start and [x["end"] for x in extra] == p.end
    # the TEI route, asked the same: per input, its chunks in order, the same offsets and vectors
    body = {"inputs": [long, TEXTS[0]], "chunking": {"mode": "chunks", "chunk_tokens": 24}}
    status, tei = _post(f"{endpoint}/embed", json.dumps(body).encode())
    assert status == 200 and [len(x) for x in tei] == [p.doc.count(0), 1], tei
    flat = [c for doc in tei for c in doc]
    np.testing.assert_allclose([c["embedding"] for c in flat], want, atol=1e-5)
    assert [(c["chunk"], c["start"], c["end"], c["tokens"]) for c in flat] == list(
        zip(p.index, p.start, p.end, p.tokens, strict=True)
    )
    body["normalize"] = False
    status, refused = _post(f"{endpoint}/embed", json.dumps(body).encode())
    assert status == 400 and "chunking gives normalized vectors" in refused["error"]["message"]


def test_ingress_is_haproxy_in_front_of_the_replica(endpoint: str) -> None:
    """rayembed sets RAY_SERVE_ENABLE_HA_PROXY: the endpoint's port belongs to HAProxy, which sends
    requests straight to the replica's own HTTP server (no Python proxy actor on the request path)."""
    import psutil

    port = int(endpoint.rsplit(":", 1)[1])
    owners = {
        psutil.Process(c.pid).name()
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid
    }
    assert owners == {"haproxy"}
    with urllib.request.urlopen(f"{endpoint}/healthz", timeout=10) as r:
        assert r.status == 200


def test_serve_processes_tolerate_a_busy_node(endpoint: str) -> None:
    """`import rayembed` gives Serve's proxy 60 s (not 5) to answer its readiness check and 30 s (not 10)
    its health check, and the processes Ray started (controller, HAProxy manager) run with them: with Ray's
    defaults, on 2 busy cores, every `serve.start` failed with its proxy killed as unhealthy (serving.md)."""
    import psutil
    import ray._private.state as state

    kinds = {"ServeController", "HAProxyManager"}
    pids = [
        a["Pid"] for a in state.actors().values() if a["State"] == "ALIVE" and a["ActorClassName"] in kinds
    ]
    assert len(pids) == 2, pids
    for pid in pids:
        env = psutil.Process(pid).environ()
        assert env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "60"
        assert env["RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"] == "30"


def test_base64_int8_extension(endpoint: str, tiny_model: Path) -> None:
    body = {"input": TEXTS, "model": "tiny-bert", "encoding_format": "base64", "precision": "int8"}
    status, resp = _post(f"{endpoint}/v1/embeddings", json.dumps(body).encode())
    assert status == 200, resp
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype=np.int8) for d in resp["data"]])
    np.testing.assert_array_equal(
        got, Embedder.load(tiny_model, device="cpu").encode(TEXTS, precision="int8")
    )


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "invalid request"),
        (b'{"model": "tiny-bert"}', 400, "input"),
        (b'{"input": ["ok", "  "], "model": "tiny-bert"}', 400, "input[1] is empty"),
        (b'{"input": [1.5, 2], "model": "tiny-bert"}', 400, "input"),
        (b'{"input": [[1, 99999999]], "model": "tiny-bert"}', 400, "token ids must be in [0, 30522)"),
        (b'{"input": [], "model": "tiny-bert"}', 400, "must not be empty"),
        (b'{"input": "x", "model": "tiny-bert", "dimensions": 64}', 400, "dimensions must be <= 32"),
        (b'{"input": "x", "model": "tiny-bert", "encoding_format": "hex"}', 400, "encoding_format"),
        (json.dumps({"input": ["x"] * 9, "model": "tiny-bert"}).encode(), 400, "too many inputs: 9 > 8"),
        (b'{"input": "x", "model": "gpt-embed"}', 404, "not found"),
        (b'{"input": "x", "model": "tiny-bert", "prompt_name": "query"}', 400, "unknown prompt_name"),
        (json.dumps({"input": "word " * 100, "model": "tiny-bert"}).encode(), 400, "longer than 64 tokens"),
        (json.dumps({"input": ["x" * 1000] * 5, "model": "tiny-bert"}).encode(), 413, "exceeds 4096"),
    ],
)
def test_bad_bodies_get_openai_style_errors(endpoint: str, body: bytes, status: int, message: str) -> None:
    got, resp = _post(f"{endpoint}/v1/embeddings", body)
    assert got == status
    assert message in resp["error"]["message"] and resp["error"]["type"] == "invalid_request_error"


def test_auth(endpoint: str) -> None:
    body = b'{"input": "x"}'
    assert _post(f"{endpoint}/v1/embeddings", body, key=None)[0] == 401
    status, resp = _post(f"{endpoint}/v1/embeddings", body, key="sk-wrong")
    assert status == 401 and resp["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{endpoint}/v1", api_key="nope", max_retries=0).embeddings.create(
            model="tiny-bert", input="x"
        )
    with urllib.request.urlopen(f"{endpoint}/healthz", timeout=10) as r:  # health stays open
        assert r.status == 200


def test_same_vector_alone_in_a_batch_and_from_the_batch_job(
    endpoint: str, tiny_model: Path, tmp_path: Path
) -> None:
    from rayembed.config import EmbedConfig
    from rayembed.embed import embed

    text = "Consistency: one encode function behind every path."
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key=KEY)
    alone = np.array(
        client.embeddings.create(model="tiny-bert", input=text, encoding_format="float").data[0].embedding
    )
    batch = client.embeddings.create(
        model="tiny-bert", input=["a much longer neighbour " * 5, text, "b"], encoding_format="float"
    )
    src = tmp_path / "one.jsonl"
    src.write_text(json.dumps({"id": 1, "text": text}) + "\n" + json.dumps({"id": 2, "text": "other"}) + "\n")
    embed(
        EmbedConfig(
            input=str(src),
            output=str(tmp_path / "out"),
            model=str(tiny_model),
            num_actors=1,
            threads_per_actor=1,
            progress=False,
        )
    )
    import pyarrow.dataset as pads

    table = pads.dataset(tmp_path / "out", format="parquet").to_table().to_pylist()
    job = np.array(next(r["embedding"] for r in table if r["id"] == 1))
    np.testing.assert_allclose(batch.data[1].embedding, alone, atol=1e-6)
    np.testing.assert_allclose(job, alone, atol=1e-6)


def test_metrics_and_readiness(endpoint: str) -> None:
    _post(f"{endpoint}/v1/embeddings", b'{"input": ["m1", "m2"]}')
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=10) as r:
        text = r.read().decode()
    for name in (
        "rayembed_requests_total",
        "rayembed_inputs_total",
        "rayembed_tokens_total",
        "rayembed_batch_inputs_bucket",
        "rayembed_request_latency_seconds_bucket",
        "rayembed_rejections_total",
    ):
        assert name in text, name
    assert 'rayembed_requests_total{status="200"}' in text
    with urllib.request.urlopen(f"{endpoint}/readyz", timeout=10) as r:
        assert json.loads(r.read())["ready"] is True


def test_openai_client_raises_on_unknown_model(endpoint: str) -> None:
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")


def test_health(endpoint: str) -> None:
    with urllib.request.urlopen(f"{endpoint}/healthz", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"


def _get(url: str, key: str | None = KEY, method: str = "GET") -> tuple[int, dict, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_tei_routes_with_the_huggingface_hub_client(
    endpoint: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients written for text-embeddings-inference work unchanged: /embed, TEI's root route, /info,
    /tokenize; normalize=false gives the pooled vectors as they are."""
    from huggingface_hub import InferenceClient, constants

    # rayembed sets HF_HUB_OFFLINE so that no model comes from a hub; a TEI client elsewhere has it unset.
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)

    local = Embedder.load(tiny_model, device="cpu")
    for url in (f"{endpoint}/embed", endpoint):  # the route, and TEI's root
        got = InferenceClient(model=url, token=KEY).feature_extraction(TEXTS)
        np.testing.assert_allclose(got, local.encode(TEXTS), atol=1e-6)
    raw = InferenceClient(model=f"{endpoint}/embed", token=KEY).feature_extraction(TEXTS[0], normalize=False)
    np.testing.assert_allclose(raw[0], local.encode(TEXTS[:1], normalize=False)[0], atol=1e-6)
    assert abs(float(np.linalg.norm(raw[0])) - 1.0) > 1e-3
    status, info, _ = _get(f"{endpoint}/info")
    assert status == 200 and info["model_id"] == "tiny-bert" and info["max_input_length"] == 64
    assert info["model_type"] == {"embedding": {"pooling": "mean"}} and len(info["model_sha"]) == 16
    status, tokens = _post(f"{endpoint}/tokenize", json.dumps({"inputs": ["Hello world"]}).encode())
    assert status == 200 and [t["id"] for t in tokens[0]] == local.tokenizer("Hello world")["input_ids"]


def test_every_error_has_the_openai_shape(endpoint: str) -> None:
    for url, method, status in ((f"{endpoint}/no/such/route", "GET", 404), (f"{endpoint}/v1/embeddings", "GET", 405),
                                (f"{endpoint}/info", "DELETE", 405)):  # fmt: skip
        got, body, _ = _get(url, method=method)
        assert got == status and set(body["error"]) == {"message", "type", "param", "code"}, body
    got, body = _post(f"{endpoint}/embed", b"{oops")
    assert got == 400 and body["error"]["type"] == "invalid_request_error"
    assert _get(f"{endpoint}/info", key="wrong")[0] == 401


def test_token_ids_and_the_revision_of_every_response(endpoint: str, tiny_model: Path) -> None:
    from rayembed.model.layout import model_revision

    local = Embedder.load(tiny_model, device="cpu")
    ids = local.tokenizer(TEXTS[0])["input_ids"]
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key=KEY)
    resp = client.embeddings.create(model="tiny-bert", input=[ids], encoding_format="float")
    np.testing.assert_allclose(resp.data[0].embedding, local.encode(TEXTS[:1])[0], atol=1e-6)
    raw = client.embeddings.with_raw_response.create(model="tiny-bert", input="x")
    assert raw.headers["x-rayembed-revision"] == model_revision(tiny_model) == raw.parse().revision  # type: ignore[attr-defined]
    assert client.models.list().data[0].revision == model_revision(tiny_model)  # type: ignore[attr-defined]
