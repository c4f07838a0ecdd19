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

from rayembed.model.batching import Tokens, length_batches, pad_batch, validate_texts
from rayembed.model.embedder import Embedder
from rayembed.model.layout import default_model_path, model_ref, resolve_model_path
from rayembed.model.vectors import PRECISIONS, postprocess

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
