"""Checkpoint merging: a weighted soup of same-architecture models, refused across architectures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny
from rayembed.cli import main
from rayembed.config import MergeConfig
from rayembed.merge import merge
from rayembed.model import Embedder


def test_weighted_soup(tiny_model: Path, tmp_path: Path) -> None:
    other = build_tiny(tmp_path / "other", seed=7)
    out = merge(
        MergeConfig(models=[str(tiny_model), str(other)], weights=[3.0, 1.0], output=str(tmp_path / "soup"))
    )
    a, b = (Embedder.load(p, device="cpu").state_dict() for p in (tiny_model, other))
    merged = Embedder.load(out["output"], device="cpu")
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, 0.75 * a[k] + 0.25 * b[k])
    assert merged.name == "tiny-bert-soup2"
    from sentence_transformers import SentenceTransformer

    texts = ["a soup of two models", "still one encode function"]
    st = SentenceTransformer(out["output"], device="cpu").encode(texts)
    np.testing.assert_allclose(merged.encode(texts), st, atol=1e-5)


def test_merge_refuses_other_architectures(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="does not match"):
        merge(MergeConfig(models=[str(tiny_model), "default"], output=str(tmp_path / "x")))
    assert main(["merge", f"models=[{tiny_model}]", "weights=[1, 2]", f"output={tmp_path / 'y'}"]) == 2
    assert "one weight per model" in capsys.readouterr().err
