"""PCA rotation of an embedding space, so a model not trained for Matryoshka gets good prefixes.

An orthogonal rotation keeps every full-width dot product (and cosine) as it was; rotating onto the
principal axes puts the most variance a prefix can hold into the first columns. all-MiniLM-L6-v2 on
SciFact keeps 93.3% of its full-width nDCG@10 at 128-d as it is and 97.6% rotated (docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib

import numpy as np


def frame_id(rotation: np.ndarray, before: str | None = None) -> str:
    """Fingerprint of the output axes a model was turned onto (after the turn `before`, if any). Two
    models with different ids emit coordinates along different axes: their weights cannot be averaged."""
    digest = hashlib.sha256(np.ascontiguousarray(rotation, dtype=np.float32).tobytes()).hexdigest()
    return hashlib.sha256(f"{before}:{digest}".encode()).hexdigest()[:16] if before else digest[:16]


def principal_axes(vectors: np.ndarray) -> np.ndarray:
    """Orthogonal [dim, dim] matrix whose columns are the principal axes of `vectors` (rows), by
    decreasing variance: `vectors @ axes` has its most variance in its first columns.

    Axes come from the centred covariance; each axis's sign makes its largest entry positive, so the
    result does not depend on the eigensolver's sign choice.
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need a [rows >= 2, dim] matrix of vectors, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("vectors hold NaN or inf")
    x = x - x.mean(axis=0)
    _, eigvecs = np.linalg.eigh(x.T @ x)  # ascending eigenvalues
    axes = eigvecs[:, ::-1]
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(axes.shape[1])])
    return np.ascontiguousarray(axes * signs, dtype=np.float32)


def ranking_axes(
    vectors: np.ndarray,
    dims: list[int],
    temperature: float = 0.1,
    steps: int = 1000,
    batch: int = 1024,
    lr: float = 2e-3,
    seed: int = 0,
) -> np.ndarray:
    """Principal axes, turned so that each prefix of width in `dims` ranks every row's neighbours as the
    full width does: an orthogonal [dim, dim] matrix like `principal_axes`, for the same use.

    Variance is not ranking: on text unlike the rows it was fitted on, the top principal axes hold
    less of what tells neighbours apart. Starting from the principal axes A0, this learns A = A0 @
    exp(S - S^T) (orthogonal for any S) by Adam on random batches of rows, minimising per width the KL
    from the full-width similarity distribution of each row over the other rows of the batch
    (softmax at `temperature`) to its prefix's. Full-width dot products stay as they were. Only the top
    k = 2 x max(dims) principal axes are turned (all of them when that reaches the width): each step's
    matrix_exp costs k^3 (11 s a step at 2,560 on a 2-core CPU, 0.6 s at k = 512:
    docs/benchmarks.md), and the axes past k, which hold the least
    variance, keep their order. With no `dims` or no `steps`, the principal axes as they are.
    """
    import torch
    import torch.nn.functional as F

    x_all = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    a0 = torch.as_tensor(principal_axes(x_all.numpy()))
    full = x_all.shape[1]
    if any(not 0 < d < full for d in dims):
        raise ValueError(f"dims must lie in (0, {full}), got {dims}")
    if not dims or not steps:
        return a0.numpy()
    gen = torch.Generator().manual_seed(seed)
    k = min(full, 2 * max(dims))  # the turn mixes the top k principal axes only: matrix_exp costs k^3
    top = a0[:, :k]
    s = torch.zeros(k, k, requires_grad=True)
    opt = torch.optim.Adam([s], lr=lr)
    n = min(batch, x_all.shape[0])
    self_pair = torch.eye(n, dtype=torch.bool)

    def neighbours(v: torch.Tensor) -> torch.Tensor:  # log-softmax of each row over the other rows
        return F.log_softmax((v @ v.T / temperature).masked_fill(self_pair, -1e4), dim=-1)

    for _ in range(steps):
        x = x_all[torch.randperm(x_all.shape[0], generator=gen)[:n]]
        target = neighbours(x)
        y = x @ (top @ torch.linalg.matrix_exp(s - s.T))
        loss = x.new_zeros(())
        for d in dims:
            pred = neighbours(F.normalize(y[:, :d], dim=-1))
            loss = loss + F.kl_div(pred, target, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        axes = torch.cat([top @ torch.linalg.matrix_exp(s - s.T), a0[:, k:]], dim=1).double()
    q, _ = torch.linalg.qr(axes)  # exact orthogonality, not float32's
    return np.ascontiguousarray((q * torch.sign(torch.diagonal(q.T @ axes))).numpy(), dtype=np.float32)
