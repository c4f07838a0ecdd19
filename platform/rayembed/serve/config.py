"""`serve` job settings: a docstring per field, checks in `__post_init__`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rayembed.model.layout import model_ref
from rayembed.model.rope import check_rope_scaling
from rayembed.settings import check


@dataclass
class ModelSpec:
    """One model of an endpoint: what to load, under which name, on which replicas (None: the
    endpoint's own setting)."""

    name: str | None
    """Name clients pass as `model` (None: the model's own name)."""
    model: str = "default"
    """Model folder or 'default'."""
    dtype: str | None = None
    """Model dtype (float32, bfloat16, float16 on GPUs)."""
    min_replicas: int | None = None
    """Autoscaling lower bound; 0 scales the model to zero when idle."""
    max_replicas: int | None = None
    """Autoscaling upper bound."""
    num_cpus: float | None = None
    """CPUs per replica."""
    num_gpus: float | None = None
    """GPUs per replica."""
    torch_threads: int | None = None
    """Torch threads per replica."""
    max_length: int | None = None
    """Most tokens of an input the model reads (None: the endpoint's setting, else the model's own)."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling of this model (None: the endpoint's setting)."""
    document_model: str | None = None
    """The document encoder of an index-compatible pair (None: the endpoint's setting)."""


METRICS_INTERVAL_S = 10.0  # Ray Serve's AutoscalingConfig.metrics_interval_s default (ray.serve.config)


@dataclass
class ServeConfig:
    model: str = "default"
    """Model folder (local or s3://) or 'default'."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint for s3:// models (else $AWS_ENDPOINT_URL, else AWS); each node fetches a
    model once into its cache (model/remote.py)."""
    model_name: str | None = None
    """Name clients pass as `model` (default: the model's own name)."""
    document_model: str | None = None
    """An index-compatible pair behind one name: this folder (a distillation's `teacher-in-frame`) embeds
    inputs sent with `input_type: document` (or prompt_name document), `model` (the student) the rest;
    both must record one frame (refused otherwise). Documents embedded offline by the same folder are
    then scored against the endpoint's query vectors (docs/serving.md "An index-compatible pair")."""
    models: list[dict[str, Any]] = field(default_factory=list)
    """Several models behind one endpoint, routed by the request's `model`: entries with `name` and
    `model` (a folder), and optionally document_model, dtype, min_replicas, max_replicas, num_cpus,
    num_gpus, torch_threads, max_length, rope_scaling (default: this config's). Each is its own autoscaled deployment behind a light
    ingress. Empty: the one `model`, served by the ingress replicas themselves (no extra hop)."""
    ingress_replicas: int = 1
    """Ingress replicas when requests are routed to model deployments (several models, or scale to zero)."""
    request_retries: int = 2
    """Routed: a request whose model replica dies while it holds it (a crash, an OOM kill, a lost node) is
    sent to another replica up to this many times (embedding has no side effect); counted in
    `rayembed_retries_total`. With one model and no routing, HAProxy retries in its place (serving.md)."""
    ingress_cpus: float = 0.5
    """CPUs per ingress replica when routed (it parses, checks and forwards; the models do the work)."""
    downscale_to_zero_delay_s: float | None = None
    """How long a model with min_replicas 0 stays idle before its last replica goes (default:
    downscale_delay_s); the first request after that waits for a cold start."""
    host: str = "127.0.0.1"
    """HTTP bind address."""
    port: int = 8000
    """HTTP port."""
    max_batch_tokens: int = 16384
    """Token budget of one model call: inputs of concurrent requests are merged up to this many tokens."""
    max_batch_inputs: int = 256
    """Most inputs in one model call."""
    batch_wait_timeout_s: float = 0.005
    """Longest an idle model's batch waits for requests already being parsed/tokenized to join (it
    starts as soon as none is; a busy model's next batch never waits)."""
    max_inputs_per_request: int = 2048
    """Inputs allowed in one request (more: 400)."""
    max_body_bytes: int = 8 << 20
    """Largest request body (more: 413)."""
    truncate: bool = True
    """Inputs longer than the model's max length: truncate (true) or refuse with 400 (false)."""
    max_length: int | None = None
    """Most tokens of an input the model reads (default: the model's own, from its folder): a long-context
    model may be raised up to its positions (e.g. 32768); refused above them. The batch job's `max_length`
    must match for the same vectors."""
    rope_scaling: dict[str, Any] | None = None
    """Stretch a RoPE model's positions ({rope_type: linear | yarn, factor: > 1,
    original_max_position_embeddings: optional}, as a model card's config.json puts it) so `max_length`
    may go up to positions x factor; models with learned positions (BERT) are refused. The batch job's
    `rope_scaling` must match for the same vectors."""
    api_keys_file: str | None = None
    """File of accepted API keys, one per line (also $RAYEMBED_API_KEYS, comma-separated); none: open."""
    max_queued_inputs: int = 16384
    """Inputs waiting in one replica's batcher before requests get 429."""
    max_ongoing_requests: int = 64
    """Requests one replica works on at once (Ray Serve)."""
    max_queued_requests: int = 256
    """Requests waiting for a replica before Serve answers 503 (-1: unbounded)."""
    min_replicas: int = 1
    """Autoscaling lower bound; 0 scales to zero when idle (requests then go through a light ingress,
    which holds the first one until a replica has started)."""
    max_replicas: int = 2
    """Autoscaling upper bound."""
    target_ongoing_requests: float = 8
    """Autoscaling target of in-flight requests per replica."""
    upscale_delay_s: float = 10.0
    """How long load must stay high before a replica is added."""
    downscale_delay_s: float = 60.0
    """How long load must stay low before a replica is removed."""
    look_back_period_s: float = 30.0
    """Window over which ongoing requests are averaged for autoscaling; must exceed the 10 s at which Ray
    2.60's replicas push their metrics (AutoscalingConfig.metrics_interval_s: the RAY_SERVE_*_PUSH_INTERVAL_S
    variables meant to replace it are not read yet), else Ray warns that it will refuse it."""
    num_cpus: float = 1
    """CPUs per replica."""
    num_gpus: float = 0
    """GPUs per replica."""
    torch_threads: int | None = None
    """Torch threads per replica (default: torch's choice)."""
    dtype: str = "float32"
    """Model dtype: float32, bfloat16, or float16 (GPU only). Match the embed job's cpu_dtype/gpu_dtype
    for the same vectors online as in batch."""

    def __post_init__(self) -> None:
        self.model = model_ref(self.model)  # replicas run in their own folders
        check(
            0 <= self.min_replicas <= self.max_replicas and self.max_replicas >= 1,
            "need 0 <= min_replicas <= max_replicas, max_replicas >= 1",
        )
        check(self.ingress_replicas >= 1, "ingress_replicas must be >= 1")
        check(self.request_retries >= 0, "request_retries must be >= 0")
        specs = self.specs()  # bad model entries fail here
        names = [s.name for s in specs]
        check(len(set(names)) == len(names), f"models need distinct names, got {names}")
        check(not self.models or all(s.name for s in specs), "every entry of models needs a name")
        check(
            self.look_back_period_s > METRICS_INTERVAL_S,
            f"look_back_period_s ({self.look_back_period_s}) must exceed the {METRICS_INTERVAL_S} s at which Ray "
            "Serve's replicas push autoscaling metrics",
        )
        check(
            min(
                self.max_batch_tokens, self.max_batch_inputs, self.max_inputs_per_request, self.max_body_bytes
            )
            >= 1,
            "batch and request limits must be >= 1",
        )
        check(
            self.max_queued_inputs >= self.max_inputs_per_request,
            "max_queued_inputs must hold one full request",
        )

    @property
    def routed(self) -> bool:
        """Requests go through an ingress to model deployments (several models, or one that scales to
        zero); otherwise the ingress replicas hold the one model."""
        return bool(self.models) or self.min_replicas == 0

    def specs(self) -> list[ModelSpec]:
        """Every model served, with the endpoint's settings filled in."""
        entries = self.models or [{"name": self.model_name, "model": self.model}]
        out = []
        for entry in entries:
            known = {f.name for f in dataclasses.fields(ModelSpec)}
            check(
                set(entry) <= known,
                f"models entry {entry}: unknown setting(s) {sorted(set(entry) - known)}; known: {sorted(known)}",
            )
            spec = ModelSpec(**{"name": None, **entry})
            for f in dataclasses.fields(ModelSpec):
                if getattr(spec, f.name) is None and f.name != "name":
                    setattr(spec, f.name, getattr(self, f.name))
            spec.model = model_ref(str(spec.model))
            spec.document_model = spec.document_model and model_ref(str(spec.document_model))
            check(
                0 <= int(spec.min_replicas or 0) <= int(spec.max_replicas or 0),
                f"models entry {entry}: need 0 <= min_replicas <= max_replicas",
            )
            check(
                spec.dtype in ("float32", "bfloat16")
                or (spec.dtype == "float16" and float(spec.num_gpus or 0) > 0),
                f"dtype must be float32|bfloat16 (or float16 with num_gpus > 0), got {spec.dtype!r}",
            )
            check_rope_scaling(spec.rope_scaling)
            out.append(spec)
        return out

    def local_cpus(self) -> float:
        """Logical CPUs a local cluster needs: every replica's, the ingress's when routed, plus one."""
        replicas = sum(float(s.num_cpus or 0) * int(s.max_replicas or 0) for s in self.specs())
        return replicas + (self.ingress_replicas * self.ingress_cpus if self.routed else 0) + 1
