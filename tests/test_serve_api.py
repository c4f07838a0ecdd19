"""The endpoint's contract without Ray: OpenAI and TEI bodies, token-id input, and the model engine's
per-request work (checks, normalisation, cutting), on the tiny model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from rayembed.model import Embedder
from rayembed.serve.api import APIError, Job, Limits, parse_request, parse_tei, parse_tokenize
from rayembed.serve.config import ServeConfig
from rayembed.serve.engine import ModelEngine

LIMITS = Limits(max_inputs=4, max_body_bytes=4096)


def _body(**kw: object) -> bytes:
    return json.dumps(kw).encode()


def test_openai_input_may_be_text_texts_or_token_ids() -> None:
    assert parse_request(_body(input="hi"), LIMITS)[1].texts == ["hi"]
    assert parse_request(_body(input=[5, 6, 7]), LIMITS)[1].ids == [[5, 6, 7]]
    assert parse_request(_body(input=[[5, 6], [7]]), LIMITS)[1].ids == [[5, 6], [7]]
    with pytest.raises(APIError, match="prompt_name applies to text input"):
        parse_request(_body(input=[5], prompt_name="query"), LIMITS)
    with pytest.raises(APIError, match="too many inputs: 5 > 4"):
        parse_request(_body(input=[[1]] * 5), LIMITS)


def test_tei_bodies() -> None:
    model, job = parse_tei(
        _body(inputs=["a", "b"], normalize=False, dimensions=8, prompt_name="q"), LIMITS, True
    )
    assert (
        model is None
        and job.texts == ["a", "b"]
        and not job.normalize
        and job.dimensions == 8
        and job.truncate
    )
    assert not parse_tei(_body(inputs="a", truncate=False), LIMITS, True)[1].truncate
    assert parse_tei(_body(inputs="a", model="m2"), LIMITS, False)[0] == "m2"
    with pytest.raises(APIError, match="truncation_direction left is not supported"):
        parse_tei(_body(inputs="a", truncation_direction="Left"), LIMITS, True)
    with pytest.raises(APIError, match="inputs\\[1\\] is empty"):
        parse_tei(_body(inputs=["a", " "]), LIMITS, True)
    req, texts = parse_tokenize(_body(inputs="a b", add_special_tokens=False), LIMITS)
    assert texts == ["a b"] and not req.add_special_tokens


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> ModelEngine:
    cfg = ServeConfig(model=str(tiny_model))
    return ModelEngine(cfg.specs()[0], cfg)


def test_engine_serves_token_ids_as_the_texts_they_encode(engine: ModelEngine, tiny_model: Path) -> None:
    texts = ["The quick brown fox.", "Embeddings map text to vectors."]
    ids = [engine.embedder.tokenizer(t)["input_ids"] for t in texts]
    by_ids = asyncio.run(engine.embed(Job(ids=ids))).vectors
    by_text = asyncio.run(engine.embed(Job(texts=texts)))
    np.testing.assert_array_equal(by_ids, by_text.vectors)
    np.testing.assert_array_equal(by_text.vectors, Embedder.load(tiny_model, device="cpu").encode(texts))
    assert by_text.revision and by_text.name == "tiny-bert" and by_text.tokens == sum(map(len, ids))
    with pytest.raises(APIError, match=r"token ids must be in \[0, 30522\)"):
        asyncio.run(engine.embed(Job(ids=[[1, 99999]])))


def test_engine_finishes_each_request_its_own_way(engine: ModelEngine) -> None:
    texts = ["alpha beta", "gamma"]
    unit = asyncio.run(engine.embed(Job(texts=texts))).vectors
    raw = asyncio.run(engine.embed(Job(texts=texts, normalize=False))).vectors
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), unit, atol=1e-6)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    cut = asyncio.run(engine.embed(Job(texts=texts, normalize=False, dimensions=8))).vectors
    np.testing.assert_array_equal(cut, raw[:, :8])  # not normalised: only cut
    for job, message in (
        (Job(texts=texts, dimensions=64), "dimensions must be <= 32"),
        (Job(texts=texts, prompt_name="query"), "unknown prompt_name 'query'"),
        (Job(texts=["word " * 100], truncate=False), "longer than 64 tokens"),
    ):
        with pytest.raises(APIError, match=message):
            asyncio.run(engine.embed(job))


def test_engine_answers_chunked_output_as_the_batch_job_embeds_it(
    engine: ModelEngine, tiny_model: Path
) -> None:
    from rayembed.model.chunking import encode_chunks
    from rayembed.serve.api import response_body

    texts = [" ".join(["A sentence of some words."] * 40), "short"]
    body = _body(input=texts, chunking={"mode": "late", "chunk_tokens": 20, "overlap": 4}, dimensions=16)
    req, job = parse_request(body, LIMITS)
    done = asyncio.run(engine.embed(job))
    model = Embedder.load(tiny_model, device="cpu")
    p, want, _ = encode_chunks(model, texts, "late", 20, 4, dim=16)
    np.testing.assert_allclose(done.vectors, want, atol=1e-6)
    data = response_body(done.vectors, "float", done.name, done.tokens, done.chunks)["data"]
    assert [d["index"] for d in data] == p.doc and p.doc.count(0) > 3 and p.doc.count(1) == 1
    assert all(texts[d["index"]][d["start"] : d["end"]] for d in data) and data[-1]["tokens"] == 1
    assert done.tokens == sum(map(len, p.ids))
    for bad, message in (
        (_body(input=texts, chunking={"chunk_tokens": 63}), "do not fit the model's window: 62 at most"),
        (_body(input=[[5, 6]], chunking={}), "chunking applies to text input"),
        (_body(input="x", chunking={"chunk_tokens": 8, "overlap": 8}), "overlap must be less than"),
        (_body(input="x", chunking={"mode": "sentences"}), "chunking.mode"),
    ):
        with pytest.raises(APIError, match=message) as e:
            asyncio.run(engine.embed(parse_request(bad, LIMITS)[1]))
        assert e.value.status == 400


def test_engine_max_length_is_the_servers_to_set_up_to_the_models_positions(tiny_model: Path) -> None:
    text = " ".join(["word"] * 100)
    cfg = ServeConfig(model=str(tiny_model), max_length=24)
    engine = ModelEngine(cfg.specs()[0], cfg)
    assert engine.describe()["max_length"] == 24
    want = Embedder.load(tiny_model, device="cpu").set_max_length(24).encode([text])
    np.testing.assert_array_equal(asyncio.run(engine.embed(Job(texts=[text]))).vectors, want)
    with pytest.raises(ValueError, match="max_length must be in 1..128"):
        cfg = ServeConfig(model=str(tiny_model), max_length=4096)
        ModelEngine(cfg.specs()[0], cfg)


def test_engine_int8_uses_the_models_calibrated_scales(tiny_model: Path, tmp_path: Path) -> None:
    texts = ["alpha beta", "gamma", "The quick brown fox jumps over the lazy dog."]
    model = Embedder.load(tiny_model, device="cpu")
    model.calibrate_int8(texts * 4)
    model.save(tmp_path / "calibrated")
    cfg = ServeConfig(model=str(tmp_path / "calibrated"))
    served = asyncio.run(ModelEngine(cfg.specs()[0], cfg).embed(Job(texts=texts, precision="int8"))).vectors
    np.testing.assert_array_equal(
        served, Embedder.load(tmp_path / "calibrated", device="cpu").encode(texts, precision="int8")
    )
    assert not np.array_equal(served, np.rint(model.encode(texts) * 127))  # not the uncalibrated codes


def test_engine_tokenize_reports_ids_text_and_offsets(engine: ModelEngine) -> None:
    [tokens] = engine.tokenize(["Hello world"], None, True)
    assert tokens[0]["special"] and tokens[0]["text"] == "[CLS]" and tokens[-1]["text"] == "[SEP]"
    words = [t for t in tokens if not t["special"]]
    assert [t["text"] for t in words] == ["Hello", "world"] and (words[1]["start"], words[1]["stop"]) == (
        6,
        11,
    )
    assert [t["id"] for t in tokens] == engine.embedder.tokenizer("Hello world")["input_ids"]
    assert not any(t["special"] for t in engine.tokenize(["Hello world"], None, False)[0])


def test_api_errors_survive_pickling() -> None:
    """A routed model deployment raises them; the ingress must get status and code intact."""
    import pickle

    e = pickle.loads(pickle.dumps(APIError(404, "gone", "model", "model_not_found")))
    assert (e.status, e.message, e.param, e.code) == (404, "gone", "model", "model_not_found")


def test_serve_config_models_and_scale_to_zero() -> None:
    cfg = ServeConfig(
        models=[{"name": "a", "model": "default"}, {"name": "b", "model": "default", "min_replicas": 0}]
    )
    assert cfg.routed and [s.name for s in cfg.specs()] == ["a", "b"]
    assert [s.min_replicas for s in cfg.specs()] == [1, 0] and cfg.specs()[0].dtype == "float32"
    assert ServeConfig(min_replicas=0).routed and not ServeConfig().routed
    with pytest.raises(ValueError, match="distinct names"):
        ServeConfig(models=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="unknown setting"):
        ServeConfig(models=[{"name": "a", "replicas": 3}])
    with pytest.raises(ValueError, match="needs a name"):
        ServeConfig(models=[{"model": "default"}, {"name": "b"}])
