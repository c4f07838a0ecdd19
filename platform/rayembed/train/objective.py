"""The training objective: from a batch of rows to text towers and the loss of their embeddings.

Four kinds, chosen by `TrainConfig.loss`:
- contrastive (infonce, symmetric_infonce, hard_infonce): queries (with their task instruction) vs
  positives (+ k hard negatives per row, groups.py), documents and negatives gathered from every
  worker; rows without in-batch negatives see only their own group, and rows with teacher scores add a
  KL term over their group (FlagEmbedding's format);
- guided (gist, score_distill): queries vs positives gathered likewise, plus the in-loop teacher's
  embeddings of both (GIST: the guide that masks false in-batch negatives; score_distill: the
  teacher whose query-document scores the student's should match);
- distill: one tower, against teacher embeddings from `teacher_column` or the in-loop teacher.
Matryoshka widths slice the trained model's embeddings only, never the teacher's; 2D Matryoshka pairs
(`matryoshka_2d`) add the loss of first-L-layer sub-models at one width each; the spread-out regulariser
(weight `spread_out_weight`) is added on the full model's full width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayembed.data.flagembedding import COLUMNS as FLAG_COLUMNS
from rayembed.data.flagembedding import Groups
from rayembed.model import Embedder
from rayembed.model.batching import Text
from rayembed.train.config import TrainConfig
from rayembed.train.dist import gather_with_grad
from rayembed.train.gradcache import LossOf
from rayembed.train.groups import candidate_mask, group_valid, groups_of, query_tower, texts_of
from rayembed.train.losses import CONTRASTIVE, GUIDED, LOSSES, EmbeddingDistill, matryoshka
from rayembed.train.regularizers import GroupScoreDistill, SpreadOut


def build_loss(cfg: TrainConfig) -> nn.Module:
    cls = LOSSES[cfg.loss]
    if cfg.loss == "symmetric_infonce":
        return cls(scale=cfg.scale, learnable=cfg.learnable_scale)
    if cfg.loss in CONTRASTIVE:
        return cls(scale=cfg.scale)
    if cfg.loss == "gist":
        return cls(scale=cfg.scale, margin=cfg.gist_margin)
    if cfg.loss == "score_distill":
        return cls(temperature=1.0, scale=cfg.scale)
    return cls(alignment=cfg.distill_alignment, kl_weight=cfg.kl_weight, temperature=cfg.temperature)


def input_columns(cfg: TrainConfig) -> list[str]:
    """The columns a batch must have: query, positive (, negative, instruction) for pair losses; text
    (, teacher); FlagEmbedding's own for data_format=flagembedding."""
    if cfg.data_format == "flagembedding":
        return list(FLAG_COLUMNS)
    if cfg.loss in CONTRASTIVE | GUIDED:
        optional = [c for c in (cfg.negative_column, cfg.instruction_column) if c]
        return [cfg.query_column, cfg.positive_column, *optional]
    return [cfg.text_column] + ([cfg.teacher_column] if cfg.teacher_column else [])


# loss_at(reps, dims, weights, tag) -> (loss summed over the Matryoshka widths `dims`, q and d for
# spread-out); each term's value goes into the step's `terms` under `tag` (the sub-model) + its name
LossAt = Callable[[list[Tensor], Sequence[int], Sequence[float] | None, str], tuple[Tensor, Tensor, Tensor]]


def objective(
    cfg: TrainConfig,
    batch: dict[str, Any],
    teacher: Embedder | None,
    device: torch.device,
    loss_fn: nn.Module | None = None,
    rotation: Tensor | None = None,
    rng: np.random.Generator | None = None,
    terms: dict[str, Tensor] | None = None,
) -> tuple[list[Sequence[Text]], LossOf]:
    """(text towers, loss of their embeddings: one matrix per tower). `loss_fn`: the run's loss module
    (kept across steps when it has parameters, e.g. a learnable scale); default: a fresh one.
    `rotation` (pca_rotation): distillation targets are rotated by it, as the model's output is.
    `rng`: samples FlagEmbedding groups (seeded by the loop from the run's position). `terms`, if given,
    gets each term's unweighted value when the loss is computed: `<loss>@<width>`, `score_kl@<width>`,
    `L<layers>/<loss>@<width>` (2D Matryoshka sub-models), `spread_out`."""
    terms = {} if terms is None else terms
    loss_fn = loss_fn or build_loss(cfg).to(device)
    if cfg.loss in CONTRASTIVE:
        groups = groups_of(cfg, batch, rng or np.random.default_rng(cfg.seed))
        towers, loss_at = _contrastive(cfg, groups, loss_fn, device, terms)
    elif cfg.loss in GUIDED:
        assert teacher is not None, f"loss={cfg.loss} needs the teacher model in the loop"
        towers, loss_at = _guided(cfg, batch, teacher, loss_fn, terms)
    else:
        assert isinstance(loss_fn, EmbeddingDistill)
        towers, loss_at = _distill(cfg, batch, teacher, device, loss_fn, rotation, terms)
    return towers, _over_sub_models(cfg, loss_at, terms)


def sub_model_layers(cfg: TrainConfig) -> list[int]:
    """The first-L-layer sub-models 2D Matryoshka trains (what the model is asked to pool besides its output)."""
    return sorted({layers for layers, _ in cfg.matryoshka_2d})


def _over_sub_models(cfg: TrainConfig, loss_at: LossAt, terms: dict[str, Tensor]) -> LossOf:
    """The full model at every Matryoshka width, plus each 2D (layers, dim) sub-model; spread-out on the
    full model's full width. With 2D pairs each tower's rows are [full | one part per sub-model]."""
    layers = sub_model_layers(cfg)

    def loss_of(reps: list[Tensor]) -> Tensor:
        parts = [r.chunk(1 + len(layers), dim=1) for r in reps]
        loss, q, d = loss_at([p[0] for p in parts], cfg.matryoshka_dims, cfg.matryoshka_weights, "")
        for n, dim in cfg.matryoshka_2d:
            i = 1 + layers.index(n)
            loss = loss + loss_at([p[i] for p in parts], [dim], None, f"L{n}/")[0]
        if not cfg.spread_out_weight:
            return loss
        spread = SpreadOut()(q, d)
        terms["spread_out"] = spread.detach()
        return loss + cfg.spread_out_weight * spread

    return loss_of


def _contrastive(
    cfg: TrainConfig, groups: Groups, loss_fn: nn.Module, device: torch.device, terms: dict[str, Tensor]
) -> tuple[list[Sequence[Text]], LossAt]:
    towers: list[Sequence[Text]] = [query_tower(cfg, groups.queries, groups.instructions), groups.positives]
    towers += groups.negatives
    masks: dict[int, Tensor | None] = {}  # by offset, worked out once per step
    scores = torch.as_tensor(groups.scores, dtype=torch.float32, device=device)
    group_kl = GroupScoreDistill(cfg.scale, cfg.score_temperature)

    def loss_at(
        reps: list[Tensor], dims: Sequence[int], weights: Sequence[float] | None, tag: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        d, offset = gather_with_grad(reps[1])
        negs = [gather_with_grad(r)[0] for r in reps[2:]]
        neg = torch.cat(negs) if negs else None
        if offset not in masks:
            masks[offset] = candidate_mask(groups, offset, device) if negs else None
        kw: dict[str, Any] = {"offset": offset} | (
            {"mask": masks[offset]} if masks[offset] is not None else {}
        )
        loss = matryoshka(loss_fn, dims, weights, reps[0], d, neg, terms=terms, name=tag + cfg.loss, **kw)
        if cfg.score_weight:
            group = torch.stack(reps[1:], dim=1)  # [B, 1 + k, D]: own positive, own negatives

            def kl(q: Tensor, g: Tensor) -> Tensor:
                return group_kl(q, g, scores, group_valid(groups, device))

            kl_loss = matryoshka(kl, dims, weights, reps[0], group, terms=terms, name=f"{tag}score_kl")
            loss = loss + cfg.score_weight * kl_loss
        return loss, reps[0], d

    return towers, loss_at


def _guided(
    cfg: TrainConfig, batch: dict[str, Any], teacher: Embedder, loss_fn: nn.Module, terms: dict[str, Tensor]
) -> tuple[list[Sequence[Text]], LossAt]:
    queries = texts_of(batch[cfg.query_column])
    tasks = list(batch[cfg.instruction_column]) if cfg.instruction_column else [None] * len(queries)
    towers: list[Sequence[Text]] = [query_tower(cfg, queries, tasks), texts_of(batch[cfg.positive_column])]
    with torch.no_grad():
        guide_q, guide_own = (teacher.embed_texts(t) for t in towers)
    guide_d = gather_with_grad(guide_own)[0]  # no grad flows: a plain all_gather
    if cfg.loss == "score_distill":  # the teacher's scaled cosines of every local query vs every document
        scores = cfg.scale * F.normalize(guide_q, dim=-1) @ F.normalize(guide_d, dim=-1).T
        fn = partial(loss_fn, teacher_scores=scores)

    def loss_at(
        reps: list[Tensor], dims: Sequence[int], weights: Sequence[float] | None, tag: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        d, offset = gather_with_grad(reps[1])
        loss = partial(loss_fn, guide_q=guide_q, guide_d=guide_d, offset=offset) if cfg.loss == "gist" else fn
        return matryoshka(loss, dims, weights, reps[0], d, terms=terms, name=tag + cfg.loss), reps[0], d

    return towers, loss_at


def _distill(
    cfg: TrainConfig,
    batch: dict[str, Any],
    teacher: Embedder | None,
    device: torch.device,
    loss_fn: EmbeddingDistill,
    rotation: Tensor | None,
    terms: dict[str, Tensor],
) -> tuple[list[Sequence[Text]], LossAt]:
    texts = texts_of(batch[cfg.text_column])
    if cfg.teacher_column:
        rows = np.stack(list(batch[cfg.teacher_column])).astype(np.float32)  # list column or 2-D array
        target = torch.as_tensor(rows, device=device)
    else:
        assert teacher is not None
        with torch.no_grad():
            target = teacher.embed_texts(texts)
    if rotation is not None:
        target = target.float() @ rotation.to(device)

    def loss_at(
        reps: list[Tensor], dims: Sequence[int], weights: Sequence[float] | None, tag: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        loss = matryoshka(loss_fn, dims, weights, reps[0], target, terms=terms, name=tag + cfg.loss)
        return loss, reps[0], reps[0]

    return [texts], loss_at


class LossState:
    """The run's loss module, kept across steps, and an AdamW of its own parameters when it has any (a
    learnable scale): DeepSpeed steps the model, `step()` the loss, with gradients averaged over workers."""

    def __init__(self, loss_fn: nn.Module, lr: float) -> None:
        self.loss_fn = loss_fn
        self.params = [p for p in loss_fn.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0) if self.params else None

    def step(self) -> None:
        if self.optimizer is None:
            return
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for p in self.params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if world > 1:
                dist.all_reduce(grad)
            p.grad = grad / world
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def metrics(self) -> dict[str, float]:
        scale = getattr(self.loss_fn, "scale", None)
        return {"scale": float(scale().detach())} if self.optimizer is not None and callable(scale) else {}

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {}
        return {"loss": self.loss_fn.state_dict(), "loss_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is not None and "loss" in state:
            self.loss_fn.load_state_dict(state["loss"])
            self.optimizer.load_state_dict(state["loss_optimizer"])
