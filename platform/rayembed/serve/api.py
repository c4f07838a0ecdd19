"""The HTTP contract of the endpoint, free of Ray: OpenAI embeddings bodies, errors, auth, formatting.

Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
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


class EmbeddingRequest(BaseModel):
    """The OpenAI embeddings body, plus `precision` (int8 | binary) and `prompt_name` as extensions."""

    model_config = ConfigDict(extra="ignore")
    input: str | list[str]
    model: str | None = None
    dimensions: int | None = Field(default=None, gt=0)
    encoding_format: Literal["float", "base64"] = "float"
    precision: Literal["float32", "int8", "binary"] = "float32"
    prompt_name: str | None = None
    user: str | None = None

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

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
    dim: int = 384
    prompts: tuple[str, ...] = ()


def parse_request(body: bytes, model_name: str, limits: Limits) -> EmbeddingRequest:
    """Validate a request body; raise APIError (413 too large, 400 malformed/invalid, 404 unknown model)."""
    if len(body) > limits.max_body_bytes:
        raise APIError(
            413, f"request body of {len(body)} bytes exceeds {limits.max_body_bytes}", code="body_too_large"
        )
    try:
        req = EmbeddingRequest.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise APIError(400, f"invalid request: {where}: {first['msg']}", param=where) from None
    texts = req.texts
    if not texts:
        raise APIError(400, "input must not be empty", param="input")
    if len(texts) > limits.max_inputs:
        raise APIError(400, f"too many inputs: {len(texts)} > {limits.max_inputs}", param="input")
    for i, t in enumerate(texts):
        if not t.strip():
            raise APIError(400, f"input[{i}] is empty", param="input")
    if req.model not in (None, model_name):
        raise APIError(
            404,
            f"model {req.model!r} not found; this endpoint serves {model_name!r}",
            "model",
            "model_not_found",
        )
    if req.dimensions is not None and req.dimensions > limits.dim:
        raise APIError(400, f"dimensions must be <= {limits.dim}", param="dimensions")
    if req.precision == "binary" and (req.dimensions or limits.dim) % 8:
        raise APIError(400, "binary precision needs dimensions divisible by 8", param="dimensions")
    if req.prompt_name is not None and req.prompt_name not in limits.prompts:
        raise APIError(
            400,
            f"unknown prompt_name {req.prompt_name!r}; known: {list(limits.prompts)}",
            param="prompt_name",
        )
    return req


def format_embedding(vec: np.ndarray, encoding_format: str) -> list[float] | list[int] | str:
    """float: a JSON list; base64: the raw little-endian bytes (float32, int8 or packed uint8)."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vec).tobytes()).decode()
    return vec.tolist()


def response_body(vectors: np.ndarray, encoding_format: str, model_name: str, tokens: int) -> dict[str, Any]:
    data = [
        {"object": "embedding", "index": i, "embedding": format_embedding(v, encoding_format)}
        for i, v in enumerate(vectors)
    ]
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
