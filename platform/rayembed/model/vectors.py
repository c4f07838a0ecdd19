"""What every job does to finished embeddings: Matryoshka truncation, re-normalising, quantisation.

The batch job, the endpoint and eval all call `postprocess`, so int8/binary codes agree everywhere.
"""

from __future__ import annotations

import numpy as np

PRECISIONS = ("float32", "int8", "binary")


def unit(emb: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (the one normalisation encode, the batch job and the endpoint share)."""
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


def postprocess(
    emb: np.ndarray, dim: int | None = None, precision: str = "float32", normalized: bool = True
) -> np.ndarray:
    """Matryoshka-truncate to `dim`, re-normalise (unless the vectors are not `normalized`: then only
    cut), then quantise.

    int8: round(x * 127) of the unit vector (no calibration set, so every caller gets the same codes).
    binary: sign bits packed 8 per byte (`np.packbits`), so `dim` must be a multiple of 8.
    """
    full = emb.shape[-1]
    if dim is not None:
        if not 0 < dim <= full:
            raise ValueError(f"dim must be in 1..{full}, got {dim}")
        emb = emb[..., :dim]
        emb = unit(emb) if normalized else emb
    emb = emb.astype(np.float32, copy=False)
    if precision == "float32":
        return emb
    if precision == "int8":
        return np.clip(np.rint(emb * 127.0), -127, 127).astype(np.int8)
    if precision == "binary":
        if emb.shape[-1] % 8:
            raise ValueError(f"binary precision needs a dim divisible by 8, got {emb.shape[-1]}")
        return np.packbits(emb > 0, axis=-1)
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
