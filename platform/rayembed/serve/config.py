"""`serve` job settings: a docstring per field, checks in `__post_init__`."""

from __future__ import annotations

import os
from dataclasses import dataclass

from rayembed.model.layout import model_ref
from rayembed.settings import check


@dataclass
class ServeConfig:
    model: str = "default"
    """Model folder or 'default'."""
    model_name: str | None = None
    """Name clients pass as `model` (default: the model's own name)."""
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
    api_keys_file: str | None = None
    """File of accepted API keys, one per line (also $RAYEMBED_API_KEYS, comma-separated); none: open."""
    max_queued_inputs: int = 16384
    """Inputs waiting in one replica's batcher before requests get 429."""
    max_ongoing_requests: int = 64
    """Requests one replica works on at once (Ray Serve)."""
    max_queued_requests: int = 256
    """Requests waiting for a replica before Serve answers 503 (-1: unbounded)."""
    min_replicas: int = 1
    """Autoscaling lower bound."""
    max_replicas: int = 2
    """Autoscaling upper bound."""
    target_ongoing_requests: float = 8
    """Autoscaling target of in-flight requests per replica."""
    upscale_delay_s: float = 10.0
    """How long load must stay high before a replica is added."""
    downscale_delay_s: float = 60.0
    """How long load must stay low before a replica is removed."""
    look_back_period_s: float = 30.0
    """Window over which ongoing requests are averaged for autoscaling; must exceed the interval at which
    replicas push their metrics (RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S, 10 s by default)."""
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
        check(1 <= self.min_replicas <= self.max_replicas, "need 1 <= min_replicas <= max_replicas")
        push = float(os.environ.get("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", 10))
        check(
            self.look_back_period_s > push,
            f"look_back_period_s ({self.look_back_period_s}) must exceed the {push} s at which replicas push "
            "autoscaling metrics (RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S)",
        )
        check(
            self.dtype in ("float32", "bfloat16") or (self.dtype == "float16" and self.num_gpus > 0),
            f"dtype must be float32|bfloat16 (or float16 with num_gpus > 0), got {self.dtype!r}",
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

    def local_cpus(self) -> float:
        """Logical CPUs a local cluster needs: every replica's, plus one."""
        return self.num_cpus * self.max_replicas + 1
