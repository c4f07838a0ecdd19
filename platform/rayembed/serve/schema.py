"""The endpoint's OpenAPI contract: what each route takes and answers, for `/openapi.json` and the clients
and fuzzers that read it (tests/test_serve_fuzz.py runs schemathesis against it).

The routes read their bodies themselves (api.py parses them, so that every error has OpenAI's shape),
so FastAPI cannot infer the request schemas: `route(...)` declares them from the same pydantic models,
with the answers of every status the route can give, errors included.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from rayembed.serve.api import EmbeddingRequest, TEIEmbedRequest, TEITokenizeRequest


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error, on every route (OpenAI's shape)."""

    error: ErrorDetail


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | list[int] | str
    chunk: int | None = None  # with `chunking`: the chunk of input `index`, input[start:end], its tokens
    start: int | None = None
    end: int | None = None
    tokens: int | None = None


class TEIChunk(BaseModel):
    """One chunk of a TEI /embed input asked with `chunking`: input[start:end], its tokens, its vector."""

    chunk: int
    start: int
    end: int
    tokens: int
    embedding: list[float]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage
    revision: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    owned_by: str
    revision: str
    dimensions: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Token(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    queued_inputs: int


ERRORS = {
    400: "malformed or invalid body",
    401: "missing or invalid API key",
    404: "unknown model",
    413: "body too large",
    429: "the replica's queue is full",
    503: "the model is busy",
}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """`node` with every `{"$ref": "#/$defs/X"}` replaced by X itself: pydantic's refs point into its own
    `$defs`, which a request body inside the OpenAPI document does not have at its root."""
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    return [_inline(v, defs) for v in node] if isinstance(node, list) else node


def _body(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema()
    schema = _inline(raw, raw.get("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def route(answer: Any, request: type[BaseModel] | None = None, errors: bool = True) -> dict[str, Any]:
    """FastAPI route settings: the 200 answer `answer` (a model or a type), the JSON body `request` and
    every error status in OpenAI's shape."""
    responses: dict[int | str, dict[str, Any]] = {200: {"model": answer}}
    if errors:
        responses |= {s: {"model": ErrorBody, "description": d} for s, d in ERRORS.items()}
    return {"responses": responses, "openapi_extra": _body(request) if request else None}


EMBEDDINGS = route(EmbeddingResponse, EmbeddingRequest)
TEI_EMBED = route(list[list[float]] | list[list[TEIChunk]], TEIEmbedRequest)
TOKENIZE = route(list[list[Token]], TEITokenizeRequest)
MODELS = route(ModelList)
INFO = route(dict[str, Any])
HEALTH = route(Health, errors=False)
READY: dict[str, Any] = {"responses": {200: {"model": Readiness}, 503: {"model": Readiness}}}
METRICS: dict[str, Any] = {
    "response_class": PlainTextResponse,
    "responses": {200: {"description": "Prometheus text format"}},
}
