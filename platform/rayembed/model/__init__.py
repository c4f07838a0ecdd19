"""The shared model: one `Embedder` and its `encode`, used by training-time eval, the batch job and the
endpoint alike.

- embedder.py  `Embedder`: backbone + pooling (+ optional Dense) + normalise; tokenize, forward, encode
- pooling.py   pooling kinds (name -> function)
- backbone.py  loading an HF backbone from a local folder; each family's transformer layer stack
- batching.py  input checks, token-budget length batches, padding
- vectors.py   Matryoshka truncation and int8/binary quantisation of finished vectors
- layout.py    the sentence-transformers folder layout (modules.json, Pooling, Dense, Normalize)
- pca.py       principal axes (the rotation behind `pca_rotation`)
- chunking.py  long texts as passages: chunk plans from the tokenizer's offsets, plain and late chunking
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `as` marks each a re-export
    from rayembed.model.batching import Tokens as Tokens
    from rayembed.model.batching import length_batches as length_batches
    from rayembed.model.batching import pad_batch as pad_batch
    from rayembed.model.batching import validate_texts as validate_texts
    from rayembed.model.embedder import Embedder as Embedder
    from rayembed.model.layout import default_model_path as default_model_path
    from rayembed.model.layout import model_ref as model_ref
    from rayembed.model.layout import resolve_model_path as resolve_model_path
    from rayembed.model.vectors import PRECISIONS as PRECISIONS
    from rayembed.model.vectors import postprocess as postprocess

# name -> submodule, imported on first use: job configs import layout.py (model_ref) and stay free of
# torch and transformers, and so do Ray Data tasks that run rayembed code.
_EXPORTS = {
    "Tokens": "batching", "length_batches": "batching", "pad_batch": "batching", "validate_texts": "batching",
    "Embedder": "embedder", "default_model_path": "layout", "model_ref": "layout",
    "resolve_model_path": "layout", "PRECISIONS": "vectors", "postprocess": "vectors",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"rayembed.model.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rayembed.model' has no attribute {name!r}")
