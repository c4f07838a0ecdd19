"""Checkpoint merging: a weighted soup of same-architecture models, refused across architectures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import DATA, build_tiny
from rayembed.cli import main
from rayembed.config import EvalConfig, MergeConfig
from rayembed.eval.job import evaluate
from rayembed.model import Embedder
from rayembed.train.merge import merge


def test_weighted_soup(tiny_model: Path, tmp_path: Path) -> None:
    other = build_tiny(tmp_path / "other", seed=7)
    calibrated = Embedder.load(other, device="cpu")
    calibrated.calibrate_int8(["int8 scales fitted to these weights", "not to a soup's"])
    calibrated.save(other)  # the base: its architecture and tokenizer, not its int8 scales
    sts = {"beir_dir": None, "sts_file": str(DATA / "stsbenchmark" / "stsbenchmark" / "sts-test.csv")}
    out = merge(
        MergeConfig(
            models=[str(tiny_model), str(other)], weights=[3.0, 1.0], output=str(tmp_path / "soup"),
            base=str(other), eval=sts,
        )
    )  # fmt: skip
    assert not (Path(out["output"]) / "int8_scales.json").exists()
    a, b = (Embedder.load(p, device="cpu").state_dict() for p in (tiny_model, other))
    merged = Embedder.load(out["output"], device="cpu")
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, 0.75 * a[k] + 0.25 * b[k])
    assert merged.name == "tiny-bert-soup2" and merged.int8_scales == {}
    from sentence_transformers import SentenceTransformer

    texts = ["a soup of two models", "still one encode function"]
    st = SentenceTransformer(out["output"], device="cpu").encode(texts)
    np.testing.assert_allclose(merged.encode(texts), st, atol=1e-5)

    # Every ingredient and the soup, evaluated alike; the soup's row is its own model's score.
    report = json.loads((Path(out["output"]) / "merge_report.json").read_text())
    assert list(report["eval"]) == [str(tiny_model), str(other), "soup"]
    own = evaluate(EvalConfig(**sts), merged)["sts"]["32"]["spearman"]
    assert report["eval"]["soup"]["sts"]["32"]["spearman"] == pytest.approx(own, abs=1e-6)
    assert out["eval"]["columns"] == ["spearman @32"] and len(out["eval"]["soup"]) == 1
    assert "| soup |" in (Path(out["output"]) / "merge_report.md").read_text()


def test_merge_refuses_other_architectures(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="does not match"):
        merge(MergeConfig(models=[str(tiny_model), "default"], output=str(tmp_path / "x")))
    assert main(["merge", f"models=[{tiny_model}]", "weights=[1, 2]", f"output={tmp_path / 'y'}"]) == 2
    assert "one weight per model" in capsys.readouterr().err


def test_soup_calibrated_on_texts_at_the_base_widths(tiny_model: Path, tmp_path: Path) -> None:
    """With calibration_texts the soup gets int8 scales of its own, fitted to its weights at the widths
    the base was calibrated at; the endpoint and the batch job then code int8 with them."""
    other = build_tiny(tmp_path / "other", seed=7)
    base = Embedder.load(other, device="cpu")
    base.calibrate_int8(["fitted to these weights", "not to a soup's", "a third text"], widths=[16])
    base.save(other)
    texts = [f"calibration text number {i} about soups and scales" for i in range(40)]
    data = tmp_path / "texts"
    data.mkdir()
    pq.write_table(pa.table({"id": list(range(40)), "body": texts}), data / "part-0.parquet")
    cfg = MergeConfig(models=[str(tiny_model), str(other)], output=str(tmp_path / "soup"), base=str(other),
                      calibration_texts=str(data), text_column="body", int8_calibration_texts=32)  # fmt: skip
    out = merge(cfg)
    soup = Embedder.load(out["output"], device="cpu")
    assert sorted(soup.int8_scales) == [16, 32] and soup.int8_scales != base.int8_scales
    fresh = Embedder.load(out["output"], device="cpu")
    expected = fresh.calibrate_int8(texts[:32], widths=[16])  # the first 32 texts, the same function
    assert soup.int8_scales == pytest.approx(expected)
    assert out["int8_scales"] == {str(w): s for w, s in sorted(soup.int8_scales.items())}
    probe = soup.encode(["a probe"], precision="int8")
    unit = soup.encode(["a probe"])
    np.testing.assert_array_equal(probe, np.clip(np.round(unit * soup.int8_scales[32]), -127, 127))

    with pytest.raises(ValueError, match="has no column 'text'"):
        merge(dataclasses.replace(cfg, text_column="text"))
    with pytest.raises(FileNotFoundError, match="calibration_texts .*nowhere does not exist"):
        merge(dataclasses.replace(cfg, calibration_texts=str(tmp_path / "nowhere")))


def test_merge_refuses_models_on_different_axes(tiny_model: Path, tmp_path: Path) -> None:
    """Runs that fitted their own pca rotation emit coordinates along different axes: averaging their
    weights mixes them, so merge refuses; models on one rotation merge and the soup keeps its id."""
    from rayembed.model.pca import frame_id, principal_axes

    rng = np.random.default_rng(0)
    axes = [principal_axes(rng.normal(size=(64, 32))) for _ in range(2)]
    folders = []
    for i, r in enumerate([axes[0], axes[0], axes[1]]):
        model = Embedder.load(build_tiny(tmp_path / f"m{i}", seed=i), device="cpu").rotate(r)
        folders.append(str(model.save(tmp_path / f"m{i}")))
    assert json.loads((tmp_path / "m2" / "rayembed.json").read_text())["frame"] == frame_id(axes[1])
    with pytest.raises(ValueError, match="different axes"):
        merge(MergeConfig(models=folders[1:], output=str(tmp_path / "refused")))
    assert not (tmp_path / "refused").exists()
    out = merge(MergeConfig(models=folders[:2], output=str(tmp_path / "soup")))
    assert Embedder.load(out["output"], device="cpu").frame == frame_id(axes[0])
