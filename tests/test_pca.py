"""PCA rotation for Matryoshka prefixes: the axes, the model's projection layer, save/load in the
sentence-transformers layout, and distillation targets rotated alike."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from rayembed.config import TrainConfig
from rayembed.model import Embedder
from rayembed.model.pca import principal_axes, ranking_axes
from rayembed.train.objective import objective

TEXTS = ["a dog runs in the park", "a cat sleeps", "rain falls on the roof", "two men talk", "hello"]


def test_principal_axes_by_hand() -> None:
    # Points on the line y = x (spread 2) with a little spread across it (0.1): the first axis is
    # (1, 1)/sqrt(2), the second (-1, 1)/sqrt(2) up to sign; signs make each axis's largest entry positive
    # (a tie here: argmax takes the first entry).
    s = 1 / np.sqrt(2)
    pts = np.array([[2, 2], [-2, -2], [0.1, -0.1], [-0.1, 0.1]]) + np.array([5.0, -3.0])  # mean is removed
    axes = principal_axes(pts)
    np.testing.assert_allclose(axes, [[s, s], [s, -s]], atol=1e-6)
    rotated = (pts - pts.mean(0)) @ axes
    np.testing.assert_allclose(rotated[:, 0], [2 / s, -2 / s, 0, 0], atol=1e-6)
    with pytest.raises(ValueError, match="rows >= 2"):
        principal_axes(np.ones((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        principal_axes(np.array([[0.0, np.nan], [1.0, 2.0]]))


def test_axes_are_orthogonal_and_sort_variance() -> None:
    g = np.random.default_rng(0)
    x = g.normal(size=(500, 16)) * np.linspace(0.1, 3, 16)  # variance grows along the columns
    axes = principal_axes(x)
    np.testing.assert_allclose(axes.T @ axes, np.eye(16), atol=1e-5)
    var = (x @ axes).var(axis=0)
    assert np.all(np.diff(var) <= 1e-9) and var[0] > 8 * var[-1]


def prefix_ranking_gap(x: np.ndarray, axes: np.ndarray, width: int, temperature: float = 0.1) -> float:
    """Mean KL from each row's full-width neighbour distribution (softmax over the other rows) to its
    width-prefix's: how far the prefix ranks neighbours from how the full width does."""

    def log_softmax(v: np.ndarray) -> np.ndarray:
        sim = v @ v.T / temperature
        np.fill_diagonal(sim, -1e4)
        sim -= sim.max(axis=1, keepdims=True)
        return sim - np.log(np.exp(sim).sum(axis=1, keepdims=True))

    p = (x @ axes)[:, :width]
    full, prefix = log_softmax(x), log_softmax(p / np.linalg.norm(p, axis=1, keepdims=True))
    return float((np.exp(full) * (full - prefix)).sum(axis=1).mean())


def test_ranking_axes_rank_prefix_neighbours_closer_to_full_width_on_unseen_rows() -> None:
    # Unit vectors from 24 tight clusters: centres spread over 6 axes, and a 7th axis of large variance
    # that only says which half a cluster is in (+-2). The top principal axis is that one, so PCA's 4-d
    # prefix spends a quarter of its width on it; ranking_axes turns the prefix towards what tells
    # neighbours apart.
    g = np.random.default_rng(0)
    centers = np.zeros((24, 16))
    centers[:, :6] = g.normal(size=(24, 6))
    centers[:, 6] = np.where(np.arange(24) % 2, 2.0, -2.0)

    def rows(n: int) -> np.ndarray:
        x = centers[g.integers(0, 24, n)] + 0.05 * g.normal(size=(n, 16))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    fit, unseen = rows(2000), rows(500)
    pca = principal_axes(fit)
    axes = ranking_axes(fit, [4], temperature=0.1, steps=150, batch=256, lr=1e-2)
    np.testing.assert_allclose(axes.T @ axes, np.eye(16), atol=1e-5)
    np.testing.assert_allclose(axes[:, 8:], pca[:, 8:], atol=1e-5)  # only the top 2 x 4 axes turn
    assert not np.allclose(axes[:, :8], pca[:, :8], atol=1e-2)
    np.testing.assert_allclose(axes[:, 8:], pca[:, 8:], atol=1e-5)  # only the top 2 x 4 axes turn
    assert not np.allclose(axes[:, :8], pca[:, :8], atol=1e-2)
    np.testing.assert_allclose((unseen @ axes) @ (unseen @ axes).T, unseen @ unseen.T, atol=1e-5)
    before, after = prefix_ranking_gap(unseen, pca, 4), prefix_ranking_gap(unseen, axes, 4)
    assert after < 0.7 * before, (before, after)  # measured 0.177 -> 0.088
    np.testing.assert_array_equal(
        axes, ranking_axes(fit, [4], temperature=0.1, steps=150, batch=256, lr=1e-2)
    )
    with pytest.raises(ValueError, match="dims"):
        ranking_axes(fit, [16])


def test_rotated_model_keeps_full_width_similarity_and_loads_in_sentence_transformers(
    tiny_model: Path, tmp_path: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    model = Embedder.load(tiny_model, device="cpu")
    plain = model.encode(TEXTS)
    axes = principal_axes(plain)
    model.rotate(axes)
    rotated = model.encode(TEXTS)
    assert model.dim == 32 and model.projection is not None
    np.testing.assert_allclose(rotated, plain @ axes, atol=1e-5)  # unit vectors stay unit vectors
    np.testing.assert_allclose(rotated @ rotated.T, plain @ plain.T, atol=1e-5)  # full width: unchanged
    # Rotating again composes with the projection already there.
    twice = Embedder.load(tiny_model, device="cpu").rotate(axes).rotate(axes.T)
    np.testing.assert_allclose(twice.encode(TEXTS), plain, atol=1e-5)

    saved = model.save(tmp_path / "rotated")
    assert (saved / "2_Dense" / "model.safetensors").is_file() and (saved / "3_Normalize").is_dir()
    again = Embedder.load(saved, device="cpu")
    np.testing.assert_allclose(again.encode(TEXTS), rotated, atol=1e-6)
    theirs = SentenceTransformer(str(saved), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(theirs, rotated, atol=1e-5)
    bf16 = Embedder.load(saved, device="cpu", dtype=torch.bfloat16)  # projection follows the model's dtype
    assert bf16.projection is not None and bf16.projection.weight.dtype == torch.bfloat16
    assert (bf16.encode(TEXTS) * rotated).sum(1).min() > 0.99

    with pytest.raises(ValueError, match="orthogonal"):
        Embedder.load(tiny_model, device="cpu").rotate(2 * axes)
    # A Dense module of another kind (here with a tanh, sentence-transformers' default) is refused, not
    # loaded as if it were linear.
    config = saved / "2_Dense" / "config.json"
    config.write_text(config.read_text().replace("linear.Identity", "activation.Tanh"))
    with pytest.raises(ValueError, match="bias-free Dense module with identity activation"):
        Embedder.load(saved, device="cpu")


def test_load_weights_adds_the_projection_a_checkpoint_has(tiny_model: Path) -> None:
    rotated = Embedder.load(tiny_model, device="cpu").rotate(np.eye(32)[::-1].copy())
    fresh = Embedder.load(tiny_model, device="cpu").load_weights(rotated.state_dict())
    np.testing.assert_allclose(fresh.encode(TEXTS), rotated.encode(TEXTS), atol=1e-6)
    state = {k: v for k, v in rotated.state_dict().items() if "layer.1." not in k}
    with pytest.raises(ValueError, match="do not fit the model: missing"):
        Embedder.load(tiny_model, device="cpu").load_weights(state)


def test_distill_targets_are_rotated_like_the_model(tiny_model: Path) -> None:
    from rayembed.train.losses import EmbeddingDistill, matryoshka

    teacher = Embedder.load(tiny_model, device="cpu").eval()
    column = teacher.encode(TEXTS)
    axes = torch.as_tensor(principal_axes(column))
    cfg = TrainConfig(data="x", output_dir="y", loss="distill", teacher_column="e", matryoshka_dims=[32, 8])
    batch = {"text": np.array(TEXTS, dtype=object), "e": np.array(list(column), dtype=object)}
    _, loss_of = objective(cfg, batch, None, torch.device("cpu"), rotation=axes)
    student = torch.randn(len(TEXTS), 32, generator=torch.Generator().manual_seed(0))
    want = matryoshka(EmbeddingDistill(), [32, 8], None, student, torch.as_tensor(column) @ axes)
    torch.testing.assert_close(loss_of([student]), want)
    # A student that is exactly the rotated teacher has no loss at any width; the unrotated one has.
    assert float(loss_of([torch.as_tensor(column) @ axes])) < 1e-5 < float(loss_of([torch.as_tensor(column)]))
    with pytest.raises(ValueError, match="pca_rows"):
        TrainConfig(data="x", output_dir="y", pca_rotation=True, pca_rows=1)
    with pytest.raises(ValueError, match="pca_ranking_steps needs pca_rotation"):
        TrainConfig(data="x", output_dir="y", pca_rotation=True, pca_ranking_steps=10)


def fitted(cfg: TrainConfig, rows: dict) -> np.ndarray:
    """The axes a new run fits: on the rows rotation_rows picks of those read."""
    from rayembed.train.job import fit_rotation, rotation_rows

    return fit_rotation(cfg, rotation_rows(cfg, rows)[0])


def test_train_job_fits_ranking_axes_for_the_matryoshka_prefixes_when_asked() -> None:
    vectors = np.random.default_rng(1).normal(size=(300, 16)).astype(np.float32)
    rows = {"embedding": vectors, "text": np.array(["t"] * 300)}
    common = {"data": "x", "output_dir": "y", "loss": "distill", "teacher_column": "embedding"}
    plain = TrainConfig(**common, pca_rotation=True, pca_rows=200, matryoshka_dims=[16, 4])  # type: ignore[arg-type]
    turned = TrainConfig(
        **common, pca_rotation=True, pca_rows=200, matryoshka_dims=[16, 4], pca_ranking_steps=5
    )  # type: ignore[arg-type]
    np.testing.assert_array_equal(fitted(plain, rows), principal_axes(vectors[:200]))
    np.testing.assert_array_equal(fitted(turned, rows), ranking_axes(vectors[:200], [4], steps=5))
    assert not np.allclose(fitted(turned, rows), principal_axes(vectors[:200]), atol=1e-4)


def test_pca_source_fits_the_axes_on_the_corpus_rows_and_the_report_says_which() -> None:
    from rayembed.train.job import PCA_SOURCE_MIN_ROWS, fit_rotation, rotation_rows

    rng = np.random.default_rng(2)
    n = 5 * PCA_SOURCE_MIN_ROWS
    general = rng.normal(size=(n, 8)) * [5, 1, 1, 1, 1, 1, 1, 1]  # most variance on axis 0
    corpus = rng.normal(size=(n, 8)) * [1, 1, 1, 1, 1, 1, 1, 5]  # ... on axis 7
    source = rng.choice(["corpus", "wikitext"], size=n, p=[0.4, 0.6])
    vectors = np.where((source == "corpus")[:, None], corpus, general).astype(np.float32)
    rows = {"embedding": vectors, "text": np.array(["t"] * n, dtype=object), "source": source}
    common = {"data": "x", "output_dir": "y", "loss": "distill", "teacher_column": "embedding"}
    cfg = TrainConfig(**common, pca_rotation=True, pca_rows=4 * PCA_SOURCE_MIN_ROWS, pca_source="corpus")  # type: ignore[arg-type]
    picked, fit = rotation_rows(cfg, rows)
    mine = source[: cfg.pca_rows] == "corpus"
    assert fit == {"rows": int(mine.sum()), "of": cfg.pca_rows, "source": "corpus"}
    axes = fit_rotation(cfg, picked)
    np.testing.assert_array_equal(axes, principal_axes(vectors[: cfg.pca_rows][mine]))
    assert abs(axes[7, 0]) > 0.99  # the corpus's own widest axis comes first, not the mix's
    mixed = fitted(dataclasses.replace(cfg, pca_source=None), rows)
    assert abs(mixed[0, 0]) > 0.99  # without pca_source: the axes of every row read, the mix's
    # Too few of the source's rows among those read (no corpus given): all of them, and the report says so.
    few = dict(rows, source=np.where(np.arange(n) < PCA_SOURCE_MIN_ROWS - 1, "corpus", "sts"))
    picked, fit = rotation_rows(cfg, few)
    assert fit == {"rows": cfg.pca_rows, "source": None, "source_rows": PCA_SOURCE_MIN_ROWS - 1}
    np.testing.assert_array_equal(picked["embedding"], vectors[: cfg.pca_rows])
    with pytest.raises(ValueError, match="passthrough_columns: \\[text, source\\]"):
        rotation_rows(cfg, {k: v for k, v in rows.items() if k != "source"})
    with pytest.raises(ValueError, match="pca_source needs pca_rotation"):
        TrainConfig(**common, pca_source="corpus")  # type: ignore[arg-type]


def test_pca_source_with_the_teacher_in_the_loop_fits_on_its_vectors_of_the_corpus_texts(
    tiny_model: Path,
) -> None:
    """No teacher column: the picked rows' texts are embedded by the teacher on the driver, and only the
    corpus's texts fit the axes (they differ from the mix's, so the axes do too)."""
    from rayembed.train.job import PCA_SOURCE_MIN_ROWS, fit_rotation, rotation_rows

    n = 2 * PCA_SOURCE_MIN_ROWS + 200
    source = np.array(["corpus" if i % 2 else "wikitext" for i in range(n)])
    words = ["protein binding", "cell receptor", "gene expression", "tumour growth", "immune response"]
    text = np.array(
        [
            f"{words[i % 5]} in assay {i}" if s == "corpus" else f"the river {i} flows past a town"
            for i, s in enumerate(source)
        ],
        dtype=object,
    )
    cfg = TrainConfig(
        data="x", output_dir="y", loss="distill", teacher=str(tiny_model), pca_rotation=True,
        pca_rows=2 * PCA_SOURCE_MIN_ROWS, pca_source="corpus",
    )  # fmt: skip
    picked, fit = rotation_rows(cfg, {"text": text, "source": source})
    assert fit == {"rows": PCA_SOURCE_MIN_ROWS, "of": cfg.pca_rows, "source": "corpus"}
    assert set(picked["source"]) == {"corpus"} and len(picked["text"]) == PCA_SOURCE_MIN_ROWS
    axes = fit_rotation(cfg, picked)
    teacher = Embedder.load(tiny_model, device="cpu")
    corpus_texts = [
        t for t, s in zip(text[: cfg.pca_rows], source[: cfg.pca_rows], strict=True) if s == "corpus"
    ]
    np.testing.assert_allclose(axes, principal_axes(teacher.encode(corpus_texts, batch_size=64)), atol=1e-5)
    mixed = fitted(dataclasses.replace(cfg, pca_source=None), {"text": text, "source": source})
    assert not np.allclose(np.abs(axes[:, 0]), np.abs(mixed[:, 0]), atol=0.05)  # the mix's first axis differs
