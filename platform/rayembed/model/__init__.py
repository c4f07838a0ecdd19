"""The shared model: one `Embedder` and its `encode`, used by training-time eval, the batch job and the
endpoint alike.

- embedder.py  `Embedder`: backbone + pooling (+ optional Dense) + normalise; tokenize, forward, encode
- pooling.py   pooling kinds (name -> function)
- backbone.py  loading an HF backbone from a local folder; each family's transformer layer stack
- batching.py  input checks, token-budget length batches, padding
- vectors.py   Matryoshka truncation and int8/binary quantisation of finished vectors
- layout.py    the sentence-transformers folder layout (modules.json, Pooling, Dense, Normalize)
- pca.py       principal axes (the rotation behind `pca_rotation`)
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayembed.model.batching import Tokens, length_batches, pad_batch, validate_texts
    from rayembed.model.embedder import Embedder
    from rayembed.model.layout import default_model_path, model_ref, resolve_model_path
    from rayembed.model.vectors import PRECISIONS, postprocess

# name -> submodule, imported on first use: job configs import layout.py (model_ref) and stay free of
# torch and transformers, and so do Ray Data tasks that run rayembed code.
_EXPORTS = {
    "Tokens": "batching", "length_batches": "batching", "pad_batch": "batching", "validate_texts": "batching",
    "Embedder": "embedder", "default_model_path": "layout", "model_ref": "layout",
    "resolve_model_path": "layout", "PRECISIONS": "vectors", "postprocess": "vectors",
}  # fmt: skip
__all__ = [
    "PRECISIONS",
    "Embedder",
    "Tokens",
    "default_model_path",
    "length_batches",
    "model_ref",
    "pad_batch",
    "postprocess",
    "resolve_model_path",
    "validate_texts",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"rayembed.model.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rayembed.model' has no attribute {name!r}")
