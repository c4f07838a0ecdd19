"""The serve job: an OpenAI-compatible `/v1/embeddings` endpoint on Ray Serve.

- config.py      `ServeConfig`
- deployment.py  the Serve deployment and app (`build_app`, `app_builder` for RayService, `run`)
- api.py         the HTTP contract, free of Ray: request bodies, errors, auth, response formatting
- batcher.py     token-budget batching fair across requests (asyncio)
- metrics.py     Prometheus metrics of a replica
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayembed.serve.deployment import EmbeddingService, app_builder, build_app, run

__all__ = ["EmbeddingService", "app_builder", "build_app", "run"]


def __getattr__(name: str) -> Any:  # Ray Serve is imported on first use (configs stay light)
    if name in __all__:
        from rayembed.serve import deployment

        return getattr(deployment, name)
    raise AttributeError(f"module 'rayembed.serve' has no attribute {name!r}")
