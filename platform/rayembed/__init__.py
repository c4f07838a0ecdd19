"""rayembed: train, batch-embed and serve text-embedding models on Ray."""

from rayembed.model import Embedder, default_model_path, postprocess

__all__ = ["Embedder", "default_model_path", "postprocess"]
__version__ = "0.1.0"
