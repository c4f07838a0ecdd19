"""Serve job: an OpenAI-compatible `/v1/embeddings` endpoint on Ray Serve.

Transport stays thin: requests are parsed and checked here, `@serve.batch` merges them, and the
replica calls `Embedder.encode` (grouped by dim and precision) exactly like the batch job does.
"""

# No `from __future__ import annotations`: FastAPI must see real types through Serve's ingress wrapper.

import asyncio
import base64
import dataclasses
from collections import defaultdict
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from rayembed.config import ServeConfig
from rayembed.model import Embedder


class EmbeddingRequest(BaseModel):
    """The OpenAI embeddings body, plus `precision` (int8 | binary) as an extension."""

    model_config = ConfigDict(extra="ignore")
    input: str | list[str]
    model: str | None = None
    dimensions: int | None = Field(default=None, gt=0)
    encoding_format: Literal["float", "base64"] = "float"
    precision: Literal["float32", "int8", "binary"] = "float32"
    user: str | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def parse_request(body: bytes, model_name: str, dim: int, max_inputs: int) -> EmbeddingRequest:
    """Validate a request body; raise APIError with an OpenAI-style message."""
    try:
        req = EmbeddingRequest.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise APIError(400, f"invalid request: {where}: {first['msg']}", param=where) from None
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts:
        raise APIError(400, "input must not be empty", param="input")
    if len(texts) > max_inputs:
        raise APIError(400, f"too many inputs: {len(texts)} > {max_inputs}", param="input")
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
    if req.dimensions is not None and req.dimensions > dim:
        raise APIError(400, f"dimensions must be <= {dim}", param="dimensions")
    if req.precision == "binary" and (req.dimensions or dim) % 8:
        raise APIError(400, "binary precision needs dimensions divisible by 8", param="dimensions")
    return req


def format_embedding(vec: np.ndarray, encoding_format: str) -> list[float] | list[int] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vec).tobytes()).decode()
    return vec.tolist()


app = FastAPI(title="rayembed", description="OpenAI-compatible embeddings on Ray Serve")


@serve.deployment
@serve.ingress(app)
class EmbeddingService:
    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = ServeConfig(**config)
        self.embedder = Embedder.load(self.cfg.model, device="cuda" if self.cfg.num_gpus else "cpu")
        self.model_name = self.cfg.model_name or self.embedder.name
        self.encode_batch.set_max_batch_size(self.cfg.max_batch_size)  # type: ignore[attr-defined]
        self.encode_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)  # type: ignore[attr-defined]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)
    async def encode_batch(self, items: list[tuple[list[str], int | None, str]]) -> list[np.ndarray]:
        """Merge queued requests; one `Embedder.encode` call per (dim, precision) group."""
        groups: dict[tuple[int | None, str], list[int]] = defaultdict(list)
        for i, (_, dim, precision) in enumerate(items):
            groups[(dim, precision)].append(i)
        results: list[np.ndarray] = [np.empty(0)] * len(items)
        for (dim, precision), members in groups.items():
            texts = [t for i in members for t in items[i][0]]
            emb = await asyncio.to_thread(self.embedder.encode, texts, dim, precision)
            start = 0
            for i in members:
                n = len(items[i][0])
                results[i] = emb[start : start + n]
                start += n
        return results

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> JSONResponse:
        try:
            req = parse_request(
                await request.body(), self.model_name, self.embedder.dim, self.cfg.max_inputs_per_request
            )
        except APIError as e:
            return e.response()
        texts = [req.input] if isinstance(req.input, str) else req.input
        emb = await self.encode_batch((texts, req.dimensions, req.precision))
        tokens = sum(
            len(ids)
            for ids in self.embedder.tokenizer(texts, truncation=True, max_length=self.embedder.max_length)[
                "input_ids"
            ]
        )
        data = [
            {"object": "embedding", "index": i, "embedding": format_embedding(v, req.encoding_format)}
            for i, v in enumerate(emb)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": self.model_name, "usage": usage})

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "owned_by": "rayembed"}],
        }

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application for `cfg` (also usable from a RayService import path)."""
    deployment = EmbeddingService.options(  # type: ignore[attr-defined]
        autoscaling_config={
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        },
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    )
    return deployment.bind(dataclasses.asdict(cfg))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`serve run rayembed.serve:app_builder model=...` / RayService entry: args are ServeConfig fields."""
    from rayembed.config import build

    return build_app(build(ServeConfig, args))


def run(cfg: ServeConfig, blocking: bool = True) -> str:
    """Start Serve on the current Ray cluster and deploy; returns the base URL."""
    from rayembed.io import ensure_ray
    from rayembed.model import resolve_model_path

    resolve_model_path(cfg.model)
    ensure_ray(cfg.num_cpus * cfg.max_replicas + 1)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name="rayembed", route_prefix="/", blocking=blocking)
    return f"http://{cfg.host}:{cfg.port}"
