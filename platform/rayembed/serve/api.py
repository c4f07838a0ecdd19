"""The HTTP contract of the endpoint, free of Ray: OpenAI and TEI request bodies, errors, auth, formatting.

Bodies become a `Job` (what to embed and what to give back); the model-specific checks (width,
prompts) are the engine's, as in a routed endpoint the ingress does not hold the model. Every error,
on every route, uses OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import base64
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Chunking(BaseModel):
    """Long inputs as passages (an extension; the batch job's `chunking` settings): one vector per chunk,
    each answered with its input's `index` and its `chunk`, `start`, `end` (input[start:end]), `tokens`."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["chunks", "late"] = "chunks"
    chunk_tokens: int | None = Field(default=None, gt=0)
    overlap: int = Field(default=0, ge=0)
    boundary: Literal["paragraph", "sentence", "token"] = "sentence"


InputType = Literal["query", "document", "search_query", "search_document"]


class EmbeddingRequest(BaseModel):
    """The OpenAI embeddings body (input: text, texts, token ids or lists of token ids), plus `precision`
    (int8 | binary), `prompt_name`, `input_type` and `chunking` as extensions."""

    model_config = ConfigDict(extra="ignore")
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    dimensions: int | None = Field(default=None, gt=0)
    encoding_format: Literal["float", "base64"] = "float"
    precision: Literal["float32", "int8", "binary"] = "float32"
    prompt_name: str | None = None
    input_type: InputType | None = None
    chunking: Chunking | None = None
    user: str | None = None


class TEIEmbedRequest(BaseModel):
    """text-embeddings-inference's /embed body; `model` and `chunking` (extensions) pick one of several
    models and ask for long inputs as passages: then each input's answer is a list of its chunks."""

    model_config = ConfigDict(extra="ignore")
    inputs: str | list[str]
    truncate: bool | None = None
    truncation_direction: Literal["right", "left", "Right", "Left"] | None = None
    normalize: bool = True
    prompt_name: str | None = None
    input_type: InputType | None = None
    dimensions: int | None = Field(default=None, gt=0)
    model: str | None = None
    chunking: Chunking | None = None


class TEITokenizeRequest(BaseModel):
    """text-embeddings-inference's /tokenize body."""

    model_config = ConfigDict(extra="ignore")
    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None
    model: str | None = None


@dataclass
class Job:
    """One request's inputs and what it wants back (OpenAI and TEI bodies both become this)."""

    texts: list[str] | None = None
    ids: list[list[int]] | None = None  # token ids as given (the model's own vocabulary)
    prompt_name: str | None = None
    truncate: bool = True
    normalize: bool = True
    dimensions: int | None = None
    precision: str = "float32"
    chunking: Chunking | None = None
    # query | document (Cohere's search_query / search_document too): picks a pair's encoder (the served
    # model's document_model for documents) and the chosen model's prompt of that name, if it has one
    input_type: str | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def __reduce__(self) -> tuple[Any, ...]:  # travels intact from a model deployment to the ingress
        return (APIError, (self.status, self.message, self.param, self.code))

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error"
        )
        if self.status >= 500:
            kind = "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_inputs: int = 2048
    max_body_bytes: int = 8 << 20


def _validate(cls: type[BaseModel], body: bytes, limits: Limits) -> Any:
    if len(body) > limits.max_body_bytes:
        raise APIError(
            413, f"request body of {len(body)} bytes exceeds {limits.max_body_bytes}", code="body_too_large"
        )
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise APIError(400, f"invalid request: {where}: {first['msg']}", param=where) from None


def _texts(value: str | list[str], limits: Limits, param: str) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise APIError(400, f"{param} must not be empty", param=param)
    if len(texts) > limits.max_inputs:
        raise APIError(400, f"too many inputs: {len(texts)} > {limits.max_inputs}", param=param)
    for i, t in enumerate(texts):
        if not t.strip():
            raise APIError(400, f"{param}[{i}] is empty", param=param)
    return texts


def parse_request(body: bytes, limits: Limits, truncate: bool = True) -> tuple[EmbeddingRequest, Job]:
    """An OpenAI embeddings body; raise APIError (413 too large, 400 malformed or invalid). `truncate`:
    the server's choice for inputs longer than the model's max length (cut, or refuse)."""
    req = _validate(EmbeddingRequest, body, limits)
    value = req.input
    if isinstance(value, list) and value and not isinstance(value[0], str):  # token ids
        rows = [value] if isinstance(value[0], int) else value
        if len(rows) > limits.max_inputs:
            raise APIError(400, f"too many inputs: {len(rows)} > {limits.max_inputs}", param="input")
        if req.prompt_name is not None or req.chunking is not None:
            which = "prompt_name" if req.prompt_name is not None else "chunking"
            raise APIError(400, f"{which} applies to text input, not to token ids", param=which)
        job = Job(ids=[list(r) for r in rows])
    else:
        job = Job(texts=_texts(value, limits, "input"), prompt_name=req.prompt_name)
    job.dimensions, job.precision, job.truncate = req.dimensions, req.precision, truncate
    job.chunking, job.input_type = _chunking(req.chunking), _input_type(req.input_type)
    return req, job


def _input_type(value: str | None) -> str | None:
    return value.removeprefix("search_") if value else None


def _chunking(c: Chunking | None) -> Chunking | None:
    if c is not None and c.chunk_tokens is not None and c.overlap >= c.chunk_tokens:
        raise APIError(400, "chunking.overlap must be less than chunking.chunk_tokens", param="chunking")
    return c


def parse_tei(body: bytes, limits: Limits, truncate: bool) -> tuple[str | None, Job]:
    """A TEI /embed body -> (model, Job); `truncate`: the server's default (TEI's --auto-truncate)."""
    req = _validate(TEIEmbedRequest, body, limits)
    if (req.truncation_direction or "right").lower() == "left":
        raise APIError(
            400,
            "truncation_direction left is not supported: texts are cut at their end",
            "truncation_direction",
        )
    job = Job(
        texts=_texts(req.inputs, limits, "inputs"), prompt_name=req.prompt_name, normalize=req.normalize
    )
    job.truncate, job.dimensions = truncate if req.truncate is None else req.truncate, req.dimensions
    job.chunking, job.input_type = _chunking(req.chunking), _input_type(req.input_type)
    if job.chunking is not None and not req.normalize:
        raise APIError(400, "chunking gives normalized vectors: leave normalize at true", param="normalize")
    return req.model, job


def tei_chunks(vectors: np.ndarray, chunks: dict[str, list[int]], inputs: int) -> list[list[dict[str, Any]]]:
    """The chunked TEI answer: per input, its chunks in order, each with `chunk`, `start`, `end`
    (input[start:end]), `tokens` and `embedding`."""
    out: list[list[dict[str, Any]]] = [[] for _ in range(inputs)]
    for i, doc in enumerate(chunks["doc"]):
        item = {k: chunks[k][i] for k in ("chunk", "start", "end", "tokens")}
        out[doc].append(item | {"embedding": vectors[i].tolist()})
    return out


def parse_tokenize(body: bytes, limits: Limits) -> tuple[TEITokenizeRequest, list[str]]:
    req = _validate(TEITokenizeRequest, body, limits)
    return req, _texts(req.inputs, limits, "inputs")


def format_embedding(vec: np.ndarray, encoding_format: str) -> list[float] | list[int] | str:
    """float: a JSON list; base64: the raw little-endian bytes (float32, int8 or packed uint8)."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vec).tobytes()).decode()
    return vec.tolist()


def response_body(
    vectors: np.ndarray,
    encoding_format: str,
    model_name: str,
    tokens: int,
    chunks: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """OpenAI's answer; with `chunks` (doc, chunk, start, end, tokens per vector) one item per chunk,
    `index` naming its input."""
    data = [
        {"object": "embedding", "index": i, "embedding": format_embedding(v, encoding_format)}
        for i, v in enumerate(vectors)
    ]
    if chunks is not None:
        for i, item in enumerate(data):
            item |= {
                "index": chunks["doc"][i],
                **{k: chunks[k][i] for k in ("chunk", "start", "end", "tokens")},
            }
    return {
        "object": "list",
        "data": data,
        "model": model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def load_api_keys(keys_file: str | None, env_var: str = "RAYEMBED_API_KEYS") -> frozenset[str]:
    """API keys from a file (one per line, # comments) and/or a comma-separated env var; empty: no auth."""
    keys = {k.strip() for k in os.environ.get(env_var, "").split(",") if k.strip()}
    if keys_file:
        lines = Path(keys_file).read_text().splitlines()
        keys |= {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
    return frozenset(keys)


def check_auth(header: str | None, keys: frozenset[str]) -> None:
    """Raise 401 unless `Authorization: Bearer <key>` names a configured key (constant-time compare)."""
    if not keys:
        return
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip(), k) for k in keys):
        raise APIError(
            401, "missing or invalid API key (send Authorization: Bearer <key>)", code="invalid_api_key"
        )


def tei_info(model: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """TEI's /info for the default model."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("rayembed")
    except PackageNotFoundError:  # run from a source tree without installing
        __version__ = "unknown"

    return {
        "model_id": model["name"], "model_sha": model["revision"], "model_dtype": model["dtype"],
        "model_type": {"embedding": {"pooling": model["pooling"]}}, "max_concurrent_requests": cfg.max_ongoing_requests,
        "max_input_length": model["max_length"], "max_batch_tokens": cfg.max_batch_tokens,
        "max_batch_requests": cfg.max_batch_inputs, "max_client_batch_size": cfg.max_inputs_per_request,
        "auto_truncate": cfg.truncate, "tokenization_workers": 1, "version": __version__, "prompts": model["prompts"],
        "rope_scaling": model["rope_scaling"],
    }  # fmt: skip
