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

from rayembed.model import Embedder, default_model_path, postprocess  # noqa: E402

__all__ = ["Embedder", "default_model_path", "postprocess"]
__version__ = "0.1.0"
