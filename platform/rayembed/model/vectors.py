"""What every job does to finished embeddings: Matryoshka truncation, re-normalising, quantisation.

The batch job, the endpoint and eval all call `postprocess`, so int8/binary codes agree everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

PRECISIONS = ("float32", "int8", "binary")


def unit(emb: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (the one normalisation encode, the batch job and the endpoint share)."""
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


def calibrate_int8(emb: np.ndarray, widths: Iterable[int], quantile: float = 0.9999) -> dict[int, float]:
    """int8 scales of a model, from its vectors of some calibration texts: per width, 127 over the
    `quantile` of |component| of the vectors cut to that width and re-normalised. Unit vectors spread
    over hundreds of axes have components of a few hundredths, which round(127 x) codes in a handful of
    levels; the calibrated scale uses the range they fill (one scale for all axes, so an int8 dot
    product still ranks as the cosine does)."""
    out = {}
    for width in sorted(set(widths)):
        if not 0 < width <= emb.shape[-1]:
            raise ValueError(f"calibration width must be in 1..{emb.shape[-1]}, got {width}")
        top = float(np.quantile(np.abs(unit(emb[:, :width])), quantile))
        out[width] = round(127.0 / max(top, 1e-3), 3)
    return out


def int8_scale(scales: Mapping[int, float] | None, dim: int) -> float:
    """The scale int8 codes of `dim`-wide unit vectors use: that of the widest calibrated width <= dim
    (narrower vectors have larger components, which a wider width's scale would clip), else 127."""
    fits = [w for w in scales or {} if w <= dim]
    return float(scales[max(fits)]) if scales and fits else 127.0


def postprocess(
    emb: np.ndarray,
    dim: int | None = None,
    precision: str = "float32",
    normalized: bool = True,
    int8_scales: Mapping[int, float] | None = None,
) -> np.ndarray:
    """Matryoshka-truncate to `dim`, re-normalise (unless the vectors are not `normalized`: then only
    cut), then quantise.

    int8: round(x * scale) of the unit vector, clipped to +-127; scale = `int8_scale(int8_scales, dim)`
    (the model's calibrated scales, `Embedder.int8_scales`; 127 for an uncalibrated model).
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
        scale = int8_scale(int8_scales, emb.shape[-1])
        return np.clip(np.rint(emb * scale), -127, 127).astype(np.int8)
    if precision == "binary":
        if emb.shape[-1] % 8:
            raise ValueError(f"binary precision needs a dim divisible by 8, got {emb.shape[-1]}")
        return np.packbits(emb > 0, axis=-1)
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
