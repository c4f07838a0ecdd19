"""The research losses and regularisers, each against a value computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rayembed.train.losses import InfoNCE
from rayembed.train.regularizers import (
    GISTLoss,
    HardnessWeightedInfoNCE,
    ScoreDistill,
    SpreadOut,
    SymmetricInfoNCE,
    matryoshka_2d,
)

E = math.e


def test_symmetric_infonce_and_learnable_scale() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # q->d: both rows log 2; d->q: d0 picks q0 among logits [5, 0], d1 must pick q1 among [5, 0].
    expected = (math.log(2) + (math.log(1 + math.exp(-5)) + math.log(1 + math.exp(5))) / 2) / 2
    assert SymmetricInfoNCE(scale=5.0)(q, d).item() == pytest.approx(expected, rel=1e-6)
    loss = SymmetricInfoNCE(scale=5.0, learnable=True)
    assert loss.scale().item() == pytest.approx(5.0)
    loss(q, d).backward()
    assert loss.log_scale is not None and loss.log_scale.grad is not None and loss.log_scale.grad.abs() > 0
    assert SymmetricInfoNCE(scale=200.0, learnable=True).scale().item() == pytest.approx(
        100.0
    )  # CLIP's clamp


def test_hardness_weighting_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # cos: positive 1, negatives 0 and -1
    w1, w2 = 2 / (1 + 1 / E), 2 * (1 / E) / (1 + 1 / E)  # exp(cos) normalised to mean 1
    expected = -math.log(E / (E + w1 * 1 + w2 / E))
    got = HardnessWeightedInfoNCE(scale=1.0, alpha=1.0, fn_margin=10.0)(q, d)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_hardness_weighting_reduces_to_infonce() -> None:
    torch.manual_seed(0)
    q, d, neg = torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 8)
    plain = InfoNCE(scale=10.0)(q, d, neg)
    assert HardnessWeightedInfoNCE(10.0, alpha=0.0, fn_margin=float("inf"))(
        q, d, neg
    ).item() == pytest.approx(plain.item(), rel=1e-5)


def test_false_negative_masking() -> None:
    q = torch.tensor([[1.0, 0.0]])
    d = torch.tensor([[0.8, 0.6], [1.0, 0.0]])  # the "negative" (cos 1) beats the positive (cos 0.8) by > 0.1
    assert HardnessWeightedInfoNCE(scale=5.0, alpha=0.0, fn_margin=0.1)(q, d).item() == pytest.approx(
        0.0, abs=1e-6
    )
    kept = HardnessWeightedInfoNCE(scale=5.0, alpha=0.0, fn_margin=0.5)(q, d).item()
    assert kept == pytest.approx(-math.log(math.exp(4) / (math.exp(4) + math.exp(5))), rel=1e-6)


def test_gist_masks_what_the_guide_calls_positive() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = q.clone()
    # Guide sees orthogonal pairs: nothing masked. Row 0 logits: qd [1, 0], qq [-inf, 0], dd [-inf, 0].
    assert GISTLoss(scale=1.0)(q, d, q, d).item() == pytest.approx(math.log(1 + 3 / E), rel=1e-6)
    # Guide sees everything as identical: every in-batch negative is masked; only positives remain.
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert GISTLoss(scale=1.0, margin=0.1)(q, d, same, same).item() == pytest.approx(0.0, abs=1e-6)


def test_gist_with_gathered_documents_by_hand() -> None:
    # The second of two workers: one local query, both workers' documents, its positive at offset 1.
    q, d = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits [q.d0, q.d1 (positive) | q.q self: masked | d1.d0, d1.d1 self: masked] = [0, 1 | -inf | 0, -inf]
    got = GISTLoss(scale=1.0)(q, d, q, d, offset=1).item()
    assert got == pytest.approx(math.log(2 + math.e) - 1.0, rel=1e-6)
    # A 3-d guide that finds d0 as close as the positive (within the margin) masks it in both blocks.
    gq, gd = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert GISTLoss(scale=1.0, margin=0.1)(q, d, gq, gd, offset=1).item() == pytest.approx(0.0, abs=1e-6)


def test_score_distill_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ps = [E / (E + 1), 1 / (E + 1)]
    expected = sum(0.5 * (math.log(0.5) - math.log(p)) for p in ps)
    assert ScoreDistill(temperature=1.0, scale=1.0)(q, d, torch.zeros(1, 2)).item() == pytest.approx(
        expected, rel=1e-6
    )
    agree = ScoreDistill(temperature=2.0, scale=1.0)(q, d, torch.tensor([[1.0, 0.0]]))
    assert agree.item() == pytest.approx(0.0, abs=1e-7)


def test_spread_out_by_hand() -> None:
    eye = torch.eye(2)
    assert SpreadOut()(eye, eye).item() == pytest.approx(0.0, abs=1e-7)  # off-diagonal pairs orthogonal
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert SpreadOut()(same, same).item() == pytest.approx(1.0 + (1.0 - 0.5))  # mean 1, second moment 1 > 1/D


def test_matryoshka_2d_sums_layer_dim_pairs() -> None:
    torch.manual_seed(1)
    layers = {3: (torch.randn(4, 8), torch.randn(4, 8)), 6: (torch.randn(4, 8), torch.randn(4, 8))}
    loss = InfoNCE(scale=10.0)
    expected = loss(layers[3][0][:, :4], layers[3][1][:, :4]) + 0.5 * loss(*layers[6])
    got = matryoshka_2d(loss, layers, [(3, 4), (6, 8)], [1.0, 0.5])
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["infonce", "symmetric_infonce", "hard_infonce"])
def test_contrastive_losses_build_from_the_train_config(name: str) -> None:
    from rayembed.config import TrainConfig
    from rayembed.train.losses import LOSSES
    from rayembed.train.objective import build_loss

    loss = build_loss(TrainConfig(data="x", output_dir="y", loss=name, scale=7.0))
    assert type(loss) is LOSSES[name]
    torch.manual_seed(2)
    q, d, neg = torch.randn(3, 8), torch.randn(6, 8), torch.randn(2, 8)
    assert torch.isfinite(loss(q, d, neg, offset=3))
