"""Eval job: retrieval metrics by hand, then the bundled MiniLM on real SciFact and STS-B data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA
from rayembed.config import EvalConfig
from rayembed.eval.job import evaluate
from rayembed.eval.metrics import ndcg_at_k, recall_at_k, retrieval_metrics


def test_ndcg_and_recall_by_hand() -> None:
    rels = {"a": 1, "c": 1}
    # hits at ranks 1 and 3: DCG = 1 + 1/log2(4); ideal = 1 + 1/log2(3)
    assert ndcg_at_k(["a", "b", "c"], rels) == pytest.approx((1 + 1 / 2) / (1 + 1 / math.log2(3)))
    assert recall_at_k(["a", "b", "c"], rels, k=2) == 0.5
    assert ndcg_at_k(["b"], rels) == 0.0


def test_retrieval_metrics_rank_by_dot_product() -> None:
    q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    d = np.array([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]], dtype=np.float32)
    qrels = {"q1": {"d1": 1}, "q2": {"d3": 1}}
    m = retrieval_metrics(q, d, ["q1", "q2"], ["d1", "d2", "d3"], qrels)
    # q1 finds d1 first (1.0); q2 ranks d2 then d3 (1/log2(3))
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert m["recall@100"] == 1.0


def test_eval_minilm_on_scifact_and_sts(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    report = evaluate(
        EvalConfig(
            model="default",
            beir_dir=str(DATA / "scifact"),
            sts_file=str(DATA / "stsbenchmark" / "stsbenchmark" / "sts-test.csv"),
            max_queries=50,
            max_docs=300,
            dims=[128],
            precisions=["float32", "int8", "binary"],
            output=str(out),
        )
    )
    assert json.loads(out.read_text()) == report
    assert report["beir"]["queries"] == 50 and report["beir"]["docs"] == 300
    # A real model is far above chance on real data (random vectors give ~0.0 nDCG and ~0 Spearman).
    assert report["beir"]["384"]["ndcg@10"] > 0.5
    assert 0.5 < report["beir"]["128"]["ndcg@10"] <= 1.0
    assert report["sts"]["384"]["spearman"] > 0.75  # published all-MiniLM-L6-v2 STS-B test: ~0.82
    assert report["sts"]["128"]["spearman"] > 0.7
    # int8 codes lose almost nothing; 1 bit per dimension loses some but stays far above chance.
    assert abs(report["beir"]["384-int8"]["ndcg@10"] - report["beir"]["384"]["ndcg@10"]) < 0.02
    assert abs(report["sts"]["128-int8"]["spearman"] - report["sts"]["128"]["spearman"]) < 0.01
    assert 0.3 < report["beir"]["384-binary"]["ndcg@10"] < report["beir"]["384"]["ndcg@10"] + 0.02
    assert report["sts"]["384-binary"]["spearman"] > 0.6
    with pytest.raises(ValueError, match="divisible by 8"):
        EvalConfig(dims=[100], precisions=["binary"])


def test_max_pairs_scores_an_even_spread_of_the_sts_file(tiny_model: Path) -> None:
    """`max_pairs` keeps pairs spread from the first to the last row: every genre block of STS-B test
    (captions, news, forums come one after another) stays in the sample, and the score is that sample's."""
    from scipy.stats import spearmanr

    from rayembed.data.readers import load_sts
    from rayembed.eval.job import sts_sample
    from rayembed.model import Embedder

    path = DATA / "stsbenchmark" / "stsbenchmark" / "sts-test.csv"
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    s1, s2, gold = sts_sample(*load_sts(path), 100)
    assert len(gold) == 100 and (s1[0], s1[-1]) == (rows[0][5], rows[-1][5])
    genre = {(r[5], r[6]): r[0] for r in rows}  # all 3 genres, not the first block's alone
    assert {genre[p] for p in zip(s1, s2, strict=True)} == {r[0] for r in rows}
    assert sts_sample(["a", "b"], ["c", "d"], [1.0, 2.0], 100) == (["a", "b"], ["c", "d"], [1.0, 2.0])

    report = evaluate(EvalConfig(model=str(tiny_model), beir_dir=None, sts_file=str(path), max_pairs=100))
    model = Embedder.load(tiny_model, device="cpu")
    cos = (model.encode(s1) * model.encode(s2)).sum(-1)
    assert report["sts"]["pairs"] == 100
    assert report["sts"]["32"]["spearman"] == pytest.approx(spearmanr(cos, gold).statistic, abs=1e-6)
    with pytest.raises(ValueError, match="max_pairs must be >= 2"):
        EvalConfig(max_pairs=1)
