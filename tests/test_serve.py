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

from rayembed.config import ServeConfig
from rayembed.model import Embedder

pytestmark = pytest.mark.usefixtures("ray_local")
TEXTS = ["The quick brown fox.", "Embeddings map text to vectors.", "Ray Serve batches requests."]


@pytest.fixture(scope="module")
def endpoint(tiny_model: Path) -> Iterator[str]:
    from ray import serve

    from conftest import free_port
    from rayembed.serve import run

    url = run(ServeConfig(model=str(tiny_model), port=free_port(), max_inputs_per_request=8), blocking=False)
    yield url
    serve.shutdown()


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_client_matches_encode(endpoint: str, tiny_model: Path) -> None:
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused")
    local = Embedder.load(tiny_model, device="cpu")
    resp = client.embeddings.create(model="tiny-bert", input=TEXTS, encoding_format="float")
    assert [d.index for d in resp.data] == [0, 1, 2] and resp.model == "tiny-bert"
    np.testing.assert_allclose(np.array([d.embedding for d in resp.data]), local.encode(TEXTS), atol=1e-5)
    assert resp.usage.prompt_tokens == sum(len(x) for x in local.tokenizer(TEXTS)["input_ids"])
    # The client's default is base64; it decodes to the same floats. A single string works too.
    one = client.embeddings.create(model="tiny-bert", input=TEXTS[1], dimensions=16)
    np.testing.assert_allclose(one.data[0].embedding, local.encode([TEXTS[1]], dim=16)[0], atol=1e-5)
    assert client.models.list().data[0].id == "tiny-bert"


def test_base64_int8_extension(endpoint: str, tiny_model: Path) -> None:
    body = {"input": TEXTS, "model": "tiny-bert", "encoding_format": "base64", "precision": "int8"}
    status, resp = _post(f"{endpoint}/v1/embeddings", json.dumps(body).encode())
    assert status == 200
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype=np.int8) for d in resp["data"]])
    np.testing.assert_array_equal(
        got, Embedder.load(tiny_model, device="cpu").encode(TEXTS, precision="int8")
    )


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "invalid request"),
        (b'{"model": "tiny-bert"}', 400, "input"),
        (b'{"input": [], "model": "tiny-bert"}', 400, "must not be empty"),
        (b'{"input": ["ok", "  "], "model": "tiny-bert"}', 400, "input[1] is empty"),
        (b'{"input": [1, 2], "model": "tiny-bert"}', 400, "input"),
        (b'{"input": "x", "model": "tiny-bert", "dimensions": 64}', 400, "dimensions must be <= 32"),
        (b'{"input": "x", "model": "tiny-bert", "encoding_format": "hex"}', 400, "encoding_format"),
        (json.dumps({"input": ["x"] * 9, "model": "tiny-bert"}).encode(), 400, "too many inputs: 9 > 8"),
        (b'{"input": "x", "model": "gpt-embed"}', 404, "not found"),
    ],
)
def test_bad_bodies_get_openai_style_errors(endpoint: str, body: bytes, status: int, message: str) -> None:
    got, resp = _post(f"{endpoint}/v1/embeddings", body)
    assert got == status
    assert message in resp["error"]["message"] and resp["error"]["type"] == "invalid_request_error"


def test_openai_client_raises_on_unknown_model(endpoint: str) -> None:
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")


def test_health(endpoint: str) -> None:
    with urllib.request.urlopen(f"{endpoint}/healthz", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
