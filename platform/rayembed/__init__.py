"""rayembed: train, batch-embed and serve text-embedding models on Ray."""

import os

# Ray Serve ingress through HAProxy: a C load balancer sends requests straight to each replica's own
# HTTP server instead of through Serve's Python proxy actor, which took ~0.5 of a 2-core machine at
# 60 req/s (docs/benchmarks.md). Set here, before Ray starts, so a local cluster's processes inherit it;
# the cluster image (cluster/Dockerfile) sets the same. RAY_SERVE_ENABLE_HA_PROXY=0 keeps Serve's proxy.
# Replicas leaving (downscaling) drain for 2 s, not 30: HAProxy, updated by Serve itself, is the only
# load balancer that must let go of them.
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
# A replica that dies drops the requests it held: HAProxy sends those that got no answer to another
# replica (embedding requests have no side effect), not only those it could not connect for (serve/ingress.py).
os.environ.setdefault("RAY_SERVE_HAPROXY_RETRY_ON", "conn-failure empty-response junk-response")
# Serve marks a proxy unhealthy and kills it when it does not answer its readiness check within 5 s (its
# health check within 10 s) three times: on a busy node (2 busy cores) the proxy's first answer took longer,
# every `serve.start` failed with the proxy killed, and a loaded proxy would be killed mid-traffic.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30")

import gc  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

# Every process that runs a model (training workers, exports, embed actors, replicas, drivers) imports
# torch, transformers (and DeepSpeed) first: ~400k objects, over which CPython's default collector (a young
# generation of 700 allocations) ran 3-6 full collections, 0.24 of ray + the model's 3.1 CPU seconds on
# 2 cores (docs/benchmarks.md "What a Ray worker process imports"). A young generation of 20,000 runs none
# during the import and still collects cycles; a threshold the host process set itself is kept.
if gc.get_threshold()[0] == 700:
    gc.set_threshold(20_000, 10, 10)

if TYPE_CHECKING:
    from rayembed.model import Embedder, default_model_path, postprocess

__all__ = ["Embedder", "default_model_path", "postprocess"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The model's names, imported on first use: a process that only reads configs or runs Ray Data
    read tasks (a FlagEmbedding file's `normalize`) never imports torch and transformers (~3 s of CPU
    and ~180 MB per process; docs/benchmarks.md)."""
    if name in __all__:
        import rayembed.model

        return getattr(rayembed.model, name)
    raise AttributeError(f"module 'rayembed' has no attribute {name!r}")
