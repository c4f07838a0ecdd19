"""Losses take embeddings; each is checked against a value computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rayembed.train.losses import LOSSES, EmbeddingDistill, InfoNCE, matryoshka


def test_infonce_hand_computed() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # query 0: logits [1, 1] * s -> -log(1/2); query 1: logits [0, 0] -> -log(1/2)
    assert InfoNCE(scale=5.0)(q, d).item() == pytest.approx(math.log(2))
    neg = torch.tensor([[0.0, 1.0]])
    # query 0: [5, 5, 0] -> log(2 + e^-5); query 1: [0, 0, 5], label 1 -> 5 - ... = log(2 + e^5) - 0
    expected = (math.log(2 + math.exp(-5)) + math.log(2 + math.exp(5))) / 2
    assert InfoNCE(scale=5.0)(q, d, neg).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_offset_picks_this_workers_positives() -> None:
    q = torch.tensor([[0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    at0 = InfoNCE(scale=1.0)(q, d, offset=0).item()
    at1 = InfoNCE(scale=1.0)(q, d, offset=1).item()
    assert at0 == pytest.approx(math.log(1 + math.e) - 0.0)  # positive is d[0] (cos 0), other cos 1
    assert at1 == pytest.approx(math.log(1 + math.e) - 1.0)


def test_distill_cosine_and_kl() -> None:
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert EmbeddingDistill("cosine", kl_weight=0.0)(t.clone(), t).item() == pytest.approx(0.0, abs=1e-7)
    s = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    cos0 = 1 / math.sqrt(2)
    assert EmbeddingDistill("cosine", kl_weight=0.0)(s, t).item() == pytest.approx((1 - cos0) / 2, rel=1e-6)
    assert EmbeddingDistill("mse", kl_weight=0.0)(s, t).item() == pytest.approx(
        ((cos0 - 1) ** 2 + cos0**2) / 4, rel=1e-6
    )
    # KL term by hand, temperature 1: rows of softmax(S S^T) vs softmax(T T^T) with S normalised.
    full = EmbeddingDistill("cosine", kl_weight=1.0, temperature=1.0)(s, t).item()
    pt = torch.softmax(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), -1)
    ps = torch.softmax(torch.tensor([[1.0, cos0], [cos0, 1.0]]), -1)
    kl = (pt * (pt.log() - ps.log())).sum() / 2
    assert full == pytest.approx((1 - cos0) / 2 + kl.item(), rel=1e-5)
    with pytest.raises(ValueError, match="differ"):
        EmbeddingDistill()(torch.ones(2, 3), torch.ones(2, 4))


def test_relational_term_takes_different_widths() -> None:
    # A 1-d student against a 2-d teacher: only the similarity matrices are compared.
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[1.0], [-1.0]])
    pt = torch.softmax(torch.eye(2), -1)
    ps = torch.softmax(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), -1)
    kl = ((pt * (pt.log() - ps.log())).sum() / 2).item()
    assert EmbeddingDistill(temperature=1.0).relational(s, t).item() == pytest.approx(kl, rel=1e-5)


def test_matryoshka_is_weighted_sum_over_prefixes() -> None:
    torch.manual_seed(0)
    q, d = torch.randn(4, 8), torch.randn(4, 8)
    loss = InfoNCE(scale=10.0)
    expected = 1.0 * loss(q, d) + 0.5 * loss(q[:, :4], d[:, :4])
    got = matryoshka(loss, [8, 4], [1.0, 0.5], q, d, None)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert matryoshka(loss, [], None, q, d).item() == pytest.approx(loss(q, d).item())


def test_registry() -> None:
    assert LOSSES["infonce"] is InfoNCE and LOSSES["distill"] is EmbeddingDistill
