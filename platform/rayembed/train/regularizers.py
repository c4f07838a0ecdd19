"""More losses and regularisers from the embedding papers; like losses.py, each takes embeddings.

- `SymmetricInfoNCE`: query->doc and doc->query InfoNCE, optionally with a learnable temperature (CLIP).
- `HardnessWeightedInfoNCE`: negatives re-weighted by their hardness, with false-negative masking (RzenEmbed).
- `GISTLoss`: in-batch negatives the guide model scores above the positive are masked (GISTEmbed).
- `ScoreDistill`: KL from a teacher's query-document scores to the student's (score distillation).
- `GroupScoreDistill`: the same over each query's own group, from scores the training rows carry.
- `SpreadOut`: global orthogonal regulariser pushing non-matching pairs towards orthogonal (EmbeddingGemma).
- `matryoshka_2d`: a loss summed over (layer, dim) sub-models (Starbucks 2D Matryoshka).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


class SymmetricInfoNCE(nn.Module):
    """(CE(q -> d) + CE(d -> q)) / 2 over cosine similarities times a scale.

    learnable: the scale is exp(log_scale), a parameter (init `scale`, clamped to <= 100 as in CLIP).
    q: [B, D]; d: [N, D] with q's positives at d[offset:offset+B]; doc->query uses those B documents.
    """

    def __init__(self, scale: float = 20.0, learnable: bool = False) -> None:
        super().__init__()
        log_scale = torch.tensor(math.log(scale))
        self.log_scale = nn.Parameter(log_scale) if learnable else None
        self.register_buffer("fixed_log_scale", log_scale, persistent=False)

    def scale(self) -> Tensor:
        log_scale: Tensor = self.log_scale if self.log_scale is not None else self.fixed_log_scale  # type: ignore[assignment]
        return log_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, q: Tensor, d: Tensor, neg: Tensor | None = None, offset: int = 0) -> Tensor:
        s = self.scale()
        docs = d if neg is None else torch.cat([d, neg])
        labels = torch.arange(q.shape[0], device=q.device)
        forward = F.cross_entropy(s * _cos(q, docs), labels + offset)
        backward = F.cross_entropy(s * _cos(d[offset : offset + q.shape[0]], q), labels)
        return (forward + backward) / 2


class HardnessWeightedInfoNCE(nn.Module):
    """InfoNCE whose negatives count exp(alpha * cos) / mean(exp(alpha * cos)) times (harder: more),
    and whose negatives scoring above the positive's cosine plus `fn_margin` are dropped as likely false
    negatives. alpha=0 and fn_margin=inf give plain InfoNCE.
    """

    def __init__(self, scale: float = 20.0, alpha: float = 1.0, fn_margin: float = 0.1) -> None:
        super().__init__()
        self.scale, self.alpha, self.fn_margin = scale, alpha, fn_margin

    def forward(self, q: Tensor, d: Tensor, neg: Tensor | None = None, offset: int = 0) -> Tensor:
        docs = d if neg is None else torch.cat([d, neg])
        cos = _cos(q, docs)
        rows = torch.arange(q.shape[0], device=q.device)
        pos = cos[rows, rows + offset]
        is_neg = torch.ones_like(cos, dtype=torch.bool)
        is_neg[rows, rows + offset] = False
        keep = is_neg & (cos <= pos[:, None] + self.fn_margin)
        w = torch.exp(self.alpha * cos.detach()) * keep
        w = w / (w.sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)).clamp(min=1e-12)
        logits = self.scale * cos
        neg_term = (w * torch.exp(logits - logits.max(1, keepdim=True).values)).sum(1)
        pos_term = torch.exp(logits[rows, rows + offset] - logits.max(1).values)
        return -(torch.log(pos_term) - torch.log(pos_term + neg_term)).mean()


class GISTLoss(nn.Module):
    """InfoNCE over query-doc, query-query and doc-doc similarities, where every in-batch negative that a
    guide model scores above the pair's own guide similarity (minus `margin`) is masked out.

    q, guide_q: [B, D] local queries; d, guide_d: [N, D] documents (gathered from every worker) with q's
    positives at d[offset:offset+B]. The guide's width may differ from the model's.
    """

    def __init__(self, scale: float = 20.0, margin: float = 0.0) -> None:
        super().__init__()
        self.scale, self.margin = scale, margin

    def forward(self, q: Tensor, d: Tensor, guide_q: Tensor, guide_d: Tensor, offset: int = 0) -> Tensor:
        rows = torch.arange(q.shape[0], device=q.device)
        pos = rows + offset
        own, guide_own = d[pos], guide_d[pos]
        g_pos = (F.normalize(guide_q, dim=-1) * F.normalize(guide_own, dim=-1)).sum(-1)[:, None] - self.margin
        blocks = []
        for s, g, own_col in (
            (_cos(q, d), _cos(guide_q, guide_d), None),  # (rows, pos): the positive, never masked
            (_cos(q, q), _cos(guide_q, guide_q), rows),  # (rows, rows): a query is not its own negative
            (_cos(own, d), _cos(guide_own, guide_d), pos),  # nor is a document
        ):
            mask = g > g_pos  # guide says: as close as the positive -> not a negative
            mask[rows, pos if own_col is None else own_col] = own_col is not None
            blocks.append((self.scale * s).masked_fill(mask, float("-inf")))
        return F.cross_entropy(torch.cat(blocks, dim=1), pos)


class ScoreDistill(nn.Module):
    """KL(softmax(teacher_scores / T) || softmax(cos(q, d) * scale / T)) per query, averaged.
    teacher_scores: [B, N], the teacher's scores of each query against the same N documents."""

    def __init__(self, temperature: float = 1.0, scale: float = 20.0) -> None:
        super().__init__()
        self.temperature, self.scale = temperature, scale

    def forward(self, q: Tensor, d: Tensor, teacher_scores: Tensor) -> Tensor:
        log_p = F.log_softmax(self.scale * _cos(q, d) / self.temperature, dim=-1)
        p_t = F.softmax(teacher_scores.detach() / self.temperature, dim=-1)
        return F.kl_div(log_p, p_t, reduction="batchmean")


class GroupScoreDistill(nn.Module):
    """Per query, KL(softmax(teacher / T) || softmax(scale * cos(q, group))) over its group: its positive
    and negatives, with teacher scores the rows carry (FlagEmbedding's pos_scores / neg_scores).

    q: [B, D]; group: [B, G, D]; teacher: [B, G] (NaN: the row has no scores and adds nothing);
    valid: [B, G] booleans, the slots that hold real texts. Mean over the rows with scores."""

    def __init__(self, scale: float = 20.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.scale, self.temperature = scale, temperature

    def forward(self, q: Tensor, group: Tensor, teacher: Tensor, valid: Tensor) -> Tensor:
        rows = ~torch.isnan(teacher[:, 0])
        if not rows.any():
            return q.sum() * 0.0  # keeps the graph (and every worker's collectives) alike
        cos = (F.normalize(q, dim=-1)[:, None, :] * F.normalize(group, dim=-1)).sum(-1)
        student = F.log_softmax((self.scale * cos).masked_fill(~valid, float("-inf")), dim=-1)
        target = F.softmax(
            (teacher.nan_to_num(0.0) / self.temperature).masked_fill(~valid, float("-inf")), dim=-1
        )
        kl = (target * (target.clamp(min=1e-12).log() - student.masked_fill(~valid, 0.0))).sum(-1)
        return kl[rows].mean()


class SpreadOut(nn.Module):
    """Global orthogonal regularisation: for non-matching pairs (q_i, d_j), i != j, with s = cos(q_i, d_j):
    mean(s)^2 + max(0, mean(s^2) - 1/D). Pushes unrelated embeddings to spread over the sphere, which
    keeps them distinguishable after quantisation."""

    def forward(self, q: Tensor, d: Tensor) -> Tensor:
        s = _cos(q, d)
        off = ~torch.eye(s.shape[0], s.shape[1], dtype=torch.bool, device=s.device)
        pairs = s[off]
        return pairs.mean() ** 2 + F.relu((pairs**2).mean() - 1.0 / q.shape[-1])


def matryoshka_2d(
    loss: Callable[..., Tensor],
    layer_embs: Mapping[int, Sequence[Tensor | None]],
    pairs: Sequence[tuple[int, int]],
    weights: Sequence[float] | None = None,
) -> Tensor:
    """sum over (layer, dim) of w * loss(x[:, :dim] for x in layer_embs[layer]) (Starbucks 2D Matryoshka).
    layer_embs maps a layer index to that layer's pooled embeddings (q, d[, neg])."""
    ws = weights or [1.0] * len(pairs)
    return sum(  # type: ignore[return-value]
        w * loss(*(None if e is None else e[:, :k] for e in layer_embs[layer]))
        for (layer, k), w in zip(pairs, ws, strict=True)
    )
