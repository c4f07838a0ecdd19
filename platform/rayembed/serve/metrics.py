"""Prometheus metrics of one replica, scraped at /metrics."""

from __future__ import annotations


class Metrics:
    """Prometheus metrics of one replica (scraped at /metrics)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("rayembed_requests", "Requests by HTTP status", ["status"], registry=r)
        self.inputs = Counter("rayembed_inputs", "Inputs embedded", registry=r)
        self.tokens = Counter("rayembed_tokens", "Tokens embedded", registry=r)
        self.rejections = Counter(
            "rayembed_rejections", "Requests refused, by reason", ["reason"], registry=r
        )
        self.retries = Counter(
            "rayembed_retries", "Routed requests sent again after their model replica died", registry=r
        )
        self.latency = Histogram("rayembed_request_latency_seconds", "Request latency", registry=r)
        buckets = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
        self.batch_inputs = Histogram(
            "rayembed_batch_inputs", "Inputs per model call", buckets=buckets, registry=r
        )
        self.batch_tokens = Histogram(
            "rayembed_batch_tokens",
            "Tokens per model call",
            buckets=tuple(64 * b for b in buckets),
            registry=r,
        )

    def on_batch(self, inputs: int, tokens: int) -> None:
        self.batch_inputs.observe(inputs)
        self.batch_tokens.observe(tokens)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
