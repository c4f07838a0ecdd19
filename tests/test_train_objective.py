"""The training objective without Ray: a teacher run in the loop and the same teacher's embeddings
given as a column make the same distillation loss; contrastive towers follow the configured columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rayembed.config import TrainConfig
from rayembed.model import Embedder
from rayembed.train import objective

TEXTS = ["a dog runs", "a cat sleeps", "rain falls on the roof", "two men talk"]


def test_teacher_column_equals_teacher_in_loop(tiny_model: Path) -> None:
    from conftest import build_tiny

    teacher = Embedder.load(tiny_model, device="cpu").eval()
    student = Embedder.load(build_tiny(tiny_model.parent / "student-obj", seed=3), device="cpu").eval()
    column = teacher.encode(TEXTS)  # what `rayembed embed` writes for the teacher
    base = dict(data="x", output_dir="y", loss="distill", matryoshka_dims=[32, 16])
    batch = {"text": np.array(TEXTS, dtype=object), "embedding": np.array(list(column), dtype=object)}
    cpu = torch.device("cpu")
    towers, in_loop = objective(TrainConfig(**base, teacher=str(tiny_model)), batch, teacher, cpu)
    towers_col, from_column = objective(TrainConfig(**base, teacher_column="embedding"), batch, None, cpu)
    assert towers == towers_col == [TEXTS]
    reps = [student(**student.tokenize(TEXTS))]
    a, b = in_loop(reps), from_column(reps)
    assert float(a.detach()) > 0
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_matryoshka_teacher_full_uses_the_full_width_target() -> None:
    from rayembed.losses import EmbeddingDistill, matryoshka_to_full

    s, t = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), torch.randn(4, 8)
    batch = {"text": np.array(TEXTS, dtype=object), "emb": np.array(list(t.numpy()), dtype=object)}
    base = dict(data="x", output_dir="y", loss="distill", teacher_column="emb", matryoshka_dims=[8, 4])
    full = objective(TrainConfig(**base, matryoshka_teacher="full"), batch, None, torch.device("cpu"))[1]
    want = matryoshka_to_full(EmbeddingDistill(), [8, 4], None, s, t)
    torch.testing.assert_close(full([s]), want)
    with pytest.raises(ValueError, match="kl_weight must be > 0"):
        TrainConfig(**base, matryoshka_teacher="full", kl_weight=0.0)
    with pytest.raises(ValueError, match="prefix.full"):
        TrainConfig(**base, matryoshka_teacher="half")


def test_contrastive_towers_and_config_checks() -> None:
    cfg = TrainConfig(data="x", output_dir="y", negative_column="neg", batch_size=8, grad_cache_chunk=4)
    batch = {
        "query": np.array(["q1", "q2"]),
        "positive": np.array(["p1", "p2"]),
        "neg": np.array(["n1", "n2"]),
    }
    towers, loss_of = objective(cfg, batch, None, torch.device("cpu"))
    assert towers == [["q1", "q2"], ["p1", "p2"], ["n1", "n2"]]
    q = torch.eye(2, 8)
    assert float(loss_of([q, q, -q])) < float(loss_of([q, q.flip(0), -q]))  # matching pairs score lower
    with pytest.raises(ValueError, match="grad_cache_chunk must divide"):
        TrainConfig(data="x", output_dir="y", batch_size=8, grad_cache_chunk=3)
    with pytest.raises(ValueError, match="teacher model or a teacher_column"):
        TrainConfig(data="x", output_dir="y", loss="distill")


def test_spread_out_weight_adds_the_regulariser() -> None:
    from rayembed.losses import InfoNCE
    from rayembed.regularizers import SpreadOut

    batch = {"query": np.array(["q1", "q2", "q3"]), "positive": np.array(["p1", "p2", "p3"])}
    q, d = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), torch.randn(3, 8)
    plain = objective(TrainConfig(data="x", output_dir="y"), batch, None, torch.device("cpu"))[1]
    spread = objective(
        TrainConfig(data="x", output_dir="y", spread_out_weight=0.5), batch, None, torch.device("cpu")
    )[1]
    torch.testing.assert_close(plain([q, d]), InfoNCE(20.0)(q, d))
    torch.testing.assert_close(spread([q, d]), InfoNCE(20.0)(q, d) + 0.5 * SpreadOut()(q, d))
    assert float(SpreadOut()(q, d)) > 0
