"""Serve job: OpenAI-compatible `/v1/embeddings` and TEI-compatible `/embed`, `/info`, `/tokenize` on Ray Serve.

Transport stays thin: the ingress checks auth and the body (api.py) and hands a `Job` to a model
engine (engine.py), which tokenizes, batches by a token budget (batcher.py) and finishes each request's
rows as the batch job does. One model: the ingress replicas hold it (no extra hop). Several models, or a
model that scales to zero: each is its own autoscaled `ModelDeployment`, and the ingress routes by the
request's `model`. Redeploying with another model folder is a rolling update (zero downtime); every
response names the model revision (header `x-rayembed-revision`). Every error has OpenAI's shape.
"""

# No `from __future__ import annotations`: FastAPI must see real types through Serve's ingress wrapper.
import asyncio
import dataclasses
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException

from rayembed.serve import schema
from rayembed.serve.api import (
    APIError,
    Limits,
    check_auth,
    load_api_keys,
    parse_request,
    parse_tei,
    parse_tokenize,
    response_body,
    tei_chunks,
    tei_info,
)
from rayembed.serve.config import ModelSpec, ServeConfig
from rayembed.serve.engine import Embedded, ModelEngine
from rayembed.serve.metrics import Metrics

app = FastAPI(title="rayembed", description="OpenAI- and TEI-compatible embeddings on Ray Serve")
REVISION = "x-rayembed-revision"


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown routes (404) and wrong methods (405) answer in OpenAI's error shape too."""
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(
        APIError(exc.status_code, message, code=str(exc.detail).lower().replace(" ", "_")).body(),
        exc.status_code,
    )


@app.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    """A bug answers in OpenAI's shape as well (the traceback goes to the replica's log)."""
    message = f"internal error: {type(exc).__name__}; see the replica log"
    return JSONResponse(APIError(500, message, code="internal_error").body(), 500)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(APIError(400, f"invalid request: {exc.errors()[0].get('msg')}").body(), 400)


def replica_died(e: BaseException) -> bool:
    """The model replica holding a call died or became unreachable (a crash, OOM kill, SIGKILL, lost
    node): the call never finished there, and an embedding call has no side effect to repeat."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    while e is not None:
        if isinstance(e, RayActorError | ActorUnavailableError | serve.exceptions.ReplicaUnavailableError):
            return True
        e = e.__cause__  # type: ignore[assignment]  # Serve wraps an upstream death in RayServeException
    return False


class Remote:
    """A model deployment behind a handle, with an engine's interface. A call whose replica dies is sent
    again (Serve routes it to a live replica) up to `retries` times, counted in `metrics.retries`."""

    def __init__(self, handle: Any, retries: int = 0, metrics: Metrics | None = None) -> None:
        self.handle, self.retries, self.metrics = handle, retries, metrics

    async def call(self, method: str, *args: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return await getattr(self.handle, method).remote(*args)
            except Exception as e:
                if attempt == self.retries or not replica_died(e):
                    raise
                if self.metrics is not None:
                    self.metrics.retries.inc()
        raise AssertionError("unreachable")

    async def embed(self, job: Any) -> Embedded:
        return await self.call("embed", job)

    async def tokenize(self, texts: list[str], prompt_name: Any, special: bool) -> Any:
        return await self.call("tokenize", texts, prompt_name, special)

    async def describe(self) -> dict[str, Any]:
        return await self.call("describe")


class Local:
    """An engine in this replica (one model, no extra hop)."""

    def __init__(self, engine: ModelEngine) -> None:
        self.engine = engine

    async def embed(self, job: Any) -> Embedded:
        return await self.engine.embed(job)

    async def tokenize(self, texts: list[str], prompt_name: Any, special: bool) -> Any:
        return await asyncio.to_thread(self.engine.tokenize, texts, prompt_name, special)

    async def describe(self) -> dict[str, Any]:
        return self.engine.describe()


@serve.deployment
@serve.ingress(app)
class EmbeddingService:
    def __init__(self, config: dict[str, Any], models: dict[str, Any] | None = None) -> None:
        self.cfg = c = ServeConfig(**config)
        self.limits = Limits(c.max_inputs_per_request, c.max_body_bytes)
        self.keys = load_api_keys(c.api_keys_file)
        self.metrics = Metrics()
        self.engine: ModelEngine | None = None
        if models:  # routed: names -> handles of ModelDeployments
            self.backends: dict[str, Any] = {
                name: Remote(h, c.request_retries, self.metrics) for name, h in models.items()
            }
        else:
            self.engine = ModelEngine(c.specs()[0], c, self.metrics)
            self.backends = {self.engine.name: Local(self.engine)}
        self.default = next(iter(self.backends))

    def backend(self, name: str | None) -> Any:
        if name is None:
            return self.backends[self.default]
        if name not in self.backends:
            raise APIError(
                404,
                f"model {name!r} not found; this endpoint serves {sorted(self.backends)}",
                "model",
                "model_not_found",
            )
        return self.backends[name]

    async def answer(self, request: Request, work: Callable[[bytes], Awaitable[Response]]) -> Response:
        """Auth, the route's work, metrics; any APIError becomes its OpenAI-shaped response."""
        start = time.perf_counter()
        try:
            check_auth(request.headers.get("authorization"), self.keys)
            response = await work(await request.body())
        except APIError as e:
            response = JSONResponse(e.body(), status_code=e.status)
            self.metrics.rejections.labels(reason=e.code or str(e.status)).inc()
        except serve.exceptions.BackPressureError as e:  # a routed model's queue is full
            response = JSONResponse(APIError(503, f"model busy: {e}", code="overloaded").body(), 503)
        self.metrics.requests.labels(status=str(response.status_code)).inc()
        self.metrics.latency.observe(time.perf_counter() - start)
        return response

    async def _openai(self, body: bytes) -> Response:
        req, job = parse_request(body, self.limits, self.cfg.truncate)
        done = await self.backend(req.model).embed(job)
        payload = response_body(done.vectors, req.encoding_format, done.name, done.tokens, done.chunks) | {
            "revision": done.revision
        }
        return JSONResponse(payload, headers={REVISION: done.revision})

    async def _tei(self, body: bytes) -> Response:
        model, job = parse_tei(body, self.limits, self.cfg.truncate)
        done = await self.backend(model).embed(job)
        if done.chunks is not None:
            answer = tei_chunks(done.vectors, done.chunks, len(job.texts or ()))
            return JSONResponse(answer, headers={REVISION: done.revision})
        return JSONResponse(done.vectors.tolist(), headers={REVISION: done.revision})

    async def _tokenize(self, body: bytes) -> Response:
        req, texts = parse_tokenize(body, self.limits)
        return JSONResponse(
            await self.backend(req.model).tokenize(texts, req.prompt_name, req.add_special_tokens)
        )

    async def _listing(self, _: bytes) -> Response:
        described = [await b.describe() for b in self.backends.values()]
        data = [{"id": d["name"], "object": "model", "owned_by": "rayembed", "revision": d["revision"],
                 "dimensions": d["dim"]} for d in described]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/embeddings", **schema.EMBEDDINGS)
    async def embeddings(self, request: Request) -> Response:
        return await self.answer(request, self._openai)

    @app.post("/embed", **schema.TEI_EMBED)
    async def embed(self, request: Request) -> Response:
        return await self.answer(request, self._tei)

    @app.post("/", **schema.TEI_EMBED)
    async def root(self, request: Request) -> Response:  # TEI's route for the model's own task
        return await self.answer(request, self._tei)

    @app.post("/tokenize", **schema.TOKENIZE)
    async def tokenize(self, request: Request) -> Response:
        return await self.answer(request, self._tokenize)

    @app.get("/v1/models", **schema.MODELS)
    async def models(self, request: Request) -> Response:
        return await self.answer(request, self._listing)

    async def _info(self, _: bytes) -> Response:
        return JSONResponse(tei_info(await self.backends[self.default].describe(), self.cfg))

    @app.get("/info", **schema.INFO)
    async def info(self, request: Request) -> Response:
        return await self.answer(request, self._info)

    @app.get("/healthz", **schema.HEALTH)
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", **schema.READY)
    async def readyz(self) -> JSONResponse:
        queued = self.engine.batcher.queued if self.engine else 0
        ready = queued < self.cfg.max_queued_inputs
        return JSONResponse({"ready": ready, "queued_inputs": queued}, status_code=200 if ready else 503)

    @app.get("/metrics", **schema.METRICS)
    async def metrics_endpoint(self) -> Response:
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4")


@serve.deployment
class ModelDeployment:
    """One model of a routed endpoint: its engine, called by the ingress through a handle."""

    def __init__(self, spec: dict[str, Any], config: dict[str, Any]) -> None:
        self.engine = ModelEngine(ModelSpec(**spec), ServeConfig(**config))

    async def embed(self, job: Any) -> Embedded:
        return await self.engine.embed(job)

    def tokenize(self, texts: list[str], prompt_name: Any, special: bool) -> Any:
        return self.engine.tokenize(texts, prompt_name, special)

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()


def _autoscaling(cfg: ServeConfig, spec: ModelSpec) -> dict[str, Any]:
    scaling = {
        "min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas,
        "target_ongoing_requests": cfg.target_ongoing_requests, "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s, "look_back_period_s": cfg.look_back_period_s,
    }  # fmt: skip
    if cfg.downscale_to_zero_delay_s is not None:
        scaling["downscale_to_zero_delay_s"] = cfg.downscale_to_zero_delay_s
    return scaling


def _actor_options(spec: Any) -> dict[str, Any]:
    """A model replica's resources; a models:/ model's replicas also get the driver's MLflow settings."""
    from rayembed.tracking import registry_env

    env = registry_env(spec.model)
    return {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus} | (
        {"runtime_env": {"env_vars": env}} if env else {}
    )


def pinned(cfg: ServeConfig) -> ServeConfig:
    """`cfg` with each `models:/<name>@<alias>` turned into the version the alias names now: every replica
    serves that version (one that autoscaling starts after the alias moved too), and deploying the same
    settings again after the alias moved is a rollout to the new version (the deployment's arguments change)."""
    from rayembed.tracking.mlflow_backend import registered

    def pin(model: str) -> str:
        if not model.startswith("models:/") or "@" not in model:
            return model
        version = registered(model)
        return f"models:/{version.name}/{version.version}"

    if cfg.models:
        models = [m | ({"model": pin(str(m["model"]))} if "model" in m else {}) for m in cfg.models]
        return dataclasses.replace(cfg, models=models, model=pin(cfg.model))
    return dataclasses.replace(cfg, model=pin(cfg.model))


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application for `cfg` (also what a RayService's import path builds), registry aliases
    pinned to their versions."""
    cfg = pinned(cfg)
    queues = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
    }
    specs = cfg.specs()
    if not cfg.routed:
        spec = specs[0]
        resources = _actor_options(spec)
        ingress = EmbeddingService.options(  # type: ignore[attr-defined]
            autoscaling_config=_autoscaling(cfg, spec), ray_actor_options=resources, **queues
        )
        return ingress.bind(dataclasses.asdict(cfg))
    from rayembed.model.layout import read_layout, resolve_model_path

    handles = {}
    for i, spec in enumerate(specs):
        name = spec.name or read_layout(resolve_model_path(spec.model, cfg.s3_endpoint_url)).name
        deployment = ModelDeployment.options(  # type: ignore[attr-defined]
            name=f"Model{i}-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)[:40], autoscaling_config=_autoscaling(cfg, spec),
            ray_actor_options=_actor_options(spec), **queues,
        )  # fmt: skip
        handles[name] = deployment.bind(dataclasses.asdict(spec) | {"name": name}, dataclasses.asdict(cfg))
    ingress = EmbeddingService.options(  # type: ignore[attr-defined]
        num_replicas=cfg.ingress_replicas, ray_actor_options={"num_cpus": cfg.ingress_cpus}, **queues
    )
    return ingress.bind(dataclasses.asdict(cfg), handles)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`serve run rayembed.serve:app_builder model=...` / RayService entry: args are ServeConfig fields."""
    from rayembed.settings import build

    return build_app(build(ServeConfig, args))


def run(cfg: ServeConfig, blocking: bool = True) -> str:
    """Deploy on the current Ray cluster (a local one if none) and return the base URL. On a cluster
    that already serves the app this is an in-place rolling update: replicas of the new model start,
    then the old ones drain, and no request fails."""
    from rayembed.io import ensure_ray
    from rayembed.model import resolve_model_path

    cfg = pinned(cfg)  # the version fetched here is the one the replicas serve
    for spec in cfg.specs():
        resolve_model_path(
            spec.model, cfg.s3_endpoint_url
        )  # a missing model fails here, not in every replica
    load_api_keys(cfg.api_keys_file)  # likewise a missing keys file
    ensure_ray(cfg.local_cpus())
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name="rayembed", route_prefix="/", blocking=blocking)
    return f"http://{cfg.host}:{cfg.port}"
