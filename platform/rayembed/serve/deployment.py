"""Serve job: an OpenAI-compatible `/v1/embeddings` endpoint on Ray Serve.

Transport stays thin: the handler checks auth and the body (api.py), tokenizes in a thread, and awaits
the replica's `TokenBatcher` (batcher.py), which merges inputs of concurrent requests into
`Embedder.encode` calls by a token budget; each request's rows are then postprocessed (dim, precision)
exactly as the batch job does. Replicas autoscale on ongoing requests; `max_ongoing_requests` and
`max_queued_requests` bound the queues so overload answers 503/429 at once.
"""

# No `from __future__ import annotations`: FastAPI must see real types through Serve's ingress wrapper.
import asyncio
import dataclasses
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from rayembed.model import Embedder, Tokens, postprocess
from rayembed.serve.api import APIError, Limits, check_auth, load_api_keys, parse_request, response_body
from rayembed.serve.batcher import Overloaded, TokenBatcher
from rayembed.serve.config import ServeConfig
from rayembed.serve.metrics import Metrics

app = FastAPI(title="rayembed", description="OpenAI-compatible embeddings on Ray Serve")
OPEN_PATHS = ("/healthz", "/readyz", "/metrics")


@serve.deployment
@serve.ingress(app)
class EmbeddingService:
    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        self.cfg = c = ServeConfig(**config)
        if c.torch_threads:
            torch.set_num_threads(c.torch_threads)
        device = "cuda" if c.num_gpus else "cpu"
        self.embedder = Embedder.load(c.model, device=device, dtype=getattr(torch, c.dtype))
        self.embedder.tokenize_threads = max(1, int(c.num_cpus))
        self.model_name = c.model_name or self.embedder.name
        self.limits = Limits(
            c.max_inputs_per_request, c.max_body_bytes, self.embedder.dim, tuple(self.embedder.prompts)
        )
        self.keys = load_api_keys(c.api_keys_file)
        self.metrics = Metrics()
        self.batcher = TokenBatcher(
            self._encode, self.embedder.dim, c.max_batch_tokens, c.max_batch_inputs, c.batch_wait_timeout_s,
            c.max_queued_inputs, self.metrics.on_batch,
        )  # fmt: skip

    def _encode(self, ids: list[list[int]], prompt_lengths: list[int] | None) -> Any:
        c = self.cfg
        return self.embedder.encode(
            Tokens(ids, [], prompt_lengths), batch_size=c.max_batch_inputs, max_tokens=c.max_batch_tokens
        )

    async def handle(self, request: Request) -> dict[str, Any]:
        check_auth(request.headers.get("authorization"), self.keys)
        with self.batcher.arriving():  # an idle model waits (up to batch_wait_timeout_s) for this one
            req = parse_request(await request.body(), self.model_name, self.limits)
            tokens = await asyncio.to_thread(self.embedder.tokenize_ids, req.texts, req.prompt_name)
        if not self.cfg.truncate and any(tokens.truncated):
            i = tokens.truncated.index(True)
            raise APIError(
                400, f"input[{i}] is longer than {self.embedder.max_length} tokens", "input", "input_too_long"
            )
        try:
            emb = await self.batcher.embed(tokens.ids, tokens.prompt_lengths)
        except Overloaded as e:
            raise APIError(429, f"server busy: {e}; retry later", code="overloaded") from None
        n = sum(len(x) for x in tokens.ids)
        self.metrics.inputs.inc(len(tokens.ids))
        self.metrics.tokens.inc(n)
        vectors = postprocess(emb, req.dimensions, req.precision)
        return response_body(vectors, req.encoding_format, self.model_name, n)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            body, status = await self.handle(request), 200
        except APIError as e:
            body, status = e.body(), e.status
            self.metrics.rejections.labels(reason=e.code or str(e.status)).inc()
        self.metrics.requests.labels(status=str(status)).inc()
        self.metrics.latency.observe(time.perf_counter() - start)
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            check_auth(request.headers.get("authorization"), self.keys)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        data = [{"id": self.model_name, "object": "model", "owned_by": "rayembed"}]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        ready = self.batcher.queued < self.cfg.max_queued_inputs
        return JSONResponse(
            {"ready": ready, "queued_inputs": self.batcher.queued}, status_code=200 if ready else 503
        )

    @app.get("/metrics")
    async def metrics_endpoint(self) -> Response:
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4")


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application for `cfg` (also usable from a RayService import path)."""
    deployment = EmbeddingService.options(  # type: ignore[attr-defined]
        autoscaling_config={
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s,
            "downscale_delay_s": cfg.downscale_delay_s,
            "look_back_period_s": cfg.look_back_period_s,
        },
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    )
    return deployment.bind(dataclasses.asdict(cfg))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`serve run rayembed.serve:app_builder model=...` / RayService entry: args are ServeConfig fields."""
    from rayembed.settings import build

    return build_app(build(ServeConfig, args))


def run(cfg: ServeConfig, blocking: bool = True) -> str:
    """Start Serve on the current Ray cluster and deploy; returns the base URL."""
    from rayembed.io import ensure_ray
    from rayembed.model import resolve_model_path

    resolve_model_path(cfg.model)
    load_api_keys(cfg.api_keys_file)  # a missing keys file fails here, not in every replica
    ensure_ray(cfg.local_cpus())
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name="rayembed", route_prefix="/", blocking=blocking)
    return f"http://{cfg.host}:{cfg.port}"
