"""Losses take embeddings, never the model. Name -> class through the plain dict `LOSSES`.

Contrastive losses are called `loss(q, d, neg=None)`; distillation losses `loss(student, teacher)`.
Inputs need not be unit length: every loss normalises, so Matryoshka prefixes `q[:, :k]` work as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class InfoNCE(nn.Module):
    """InfoNCE / MultipleNegativesRanking: query i must pick document i among all documents.

    q: [B, D] queries; d: [N, D] documents where the positives of the B queries are d[offset:offset+B]
    (offset lets a worker score its local queries against documents gathered from every worker);
    neg: optional [M, D] extra hard negatives shared by all queries. Cosine similarity times `scale`.
    mask: optional [B, N + M] booleans, the candidates each query may see (per-row groups without
    in-batch negatives, unused negative slots); a query's own positive must be among them.
    """

    def __init__(self, scale: float = 20.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(
        self, q: Tensor, d: Tensor, neg: Tensor | None = None, offset: int = 0, mask: Tensor | None = None
    ) -> Tensor:
        q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
        docs = d if neg is None else torch.cat([d, F.normalize(neg, dim=-1)])
        logits = self.scale * q @ docs.T
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        labels = torch.arange(q.shape[0], device=q.device) + offset
        return F.cross_entropy(logits, labels)


class EmbeddingDistill(nn.Module):
    """Teacher -> student embedding distillation.

    alignment: `cosine` (1 - cos(s_i, t_i)) or `mse` on unit vectors; plus `kl_weight` times
    KL(softmax(T T^T / tau) || softmax(S S^T / tau)), the similarity-matrix (relational) term.
    Student and teacher must have the same width (initialise the student from the teacher's layers).
    """

    def __init__(self, alignment: str = "cosine", kl_weight: float = 1.0, temperature: float = 0.05) -> None:
        super().__init__()
        if alignment not in ("cosine", "mse"):
            raise ValueError(f"alignment must be 'cosine' or 'mse', got {alignment!r}")
        self.alignment = alignment
        self.kl_weight = kl_weight
        self.temperature = temperature

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
        s, t = F.normalize(student, dim=-1), F.normalize(teacher.detach(), dim=-1)
        if self.alignment == "cosine":
            align = (1 - (s * t).sum(-1)).mean()
        else:
            align = F.mse_loss(s, t)
        return align + self.kl_weight * self.relational(s, t) if self.kl_weight else align

    def relational(self, student: Tensor, teacher: Tensor) -> Tensor:
        """KL(softmax(T T^T / tau) || softmax(S S^T / tau)) over the batch (the widths may differ)."""
        s, t = F.normalize(student, dim=-1), F.normalize(teacher.detach(), dim=-1)
        log_p_s = F.log_softmax(s @ s.T / self.temperature, dim=-1)
        p_t = F.softmax(t @ t.T / self.temperature, dim=-1)
        return F.kl_div(log_p_s, p_t, reduction="batchmean")


def _registry() -> dict[str, type[nn.Module]]:
    from rayembed.train.regularizers import GISTLoss, HardnessWeightedInfoNCE, ScoreDistill, SymmetricInfoNCE

    return {
        "infonce": InfoNCE,
        "symmetric_infonce": SymmetricInfoNCE,
        "hard_infonce": HardnessWeightedInfoNCE,
        "gist": GISTLoss,
        "score_distill": ScoreDistill,
        "distill": EmbeddingDistill,
    }


LOSSES: dict[str, type[nn.Module]] = _registry()
CONTRASTIVE = {"infonce", "symmetric_infonce", "hard_infonce"}  # called loss(q, d, neg, offset=...)
GUIDED = {"gist", "score_distill"}  # query/positive pairs plus an in-loop teacher's embeddings of both


def matryoshka(
    loss: Callable[..., Tensor],
    dims: Sequence[int],
    weights: Sequence[float] | None,
    *embs: Tensor | None,
    terms: dict[str, Tensor] | None = None,
    name: str = "loss",
    **kw: Any,
) -> Tensor:
    """sum_k w_k * loss(x[..., :k] for x in embs): every embedding cut to its first k features (the last
    axis, so [B, G, D] groups too). Empty `dims` means the full width only. `terms`, if given, gets each
    width's unweighted value as `name@k` (`name` alone for the full width only), detached and left on its
    device: read as a number only where it is logged (no device sync per term on the training path)."""
    if not dims:
        value = loss(*embs, **kw)
        if terms is not None:
            terms[name] = value.detach()
        return value
    ws = weights or [1.0] * len(dims)
    values = [loss(*(None if e is None else e[..., :k] for e in embs), **kw) for k in dims]
    if terms is not None:
        terms.update({f"{name}@{k}": v.detach() for k, v in zip(dims, values, strict=True)})
    return sum(w * v for w, v in zip(ws, values, strict=True))  # type: ignore[return-value]
