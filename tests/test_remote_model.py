"""Models on S3 (the loopback server): fetched once per node into a cache keyed by their content."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny
from rayembed.io import upload_dir
from rayembed.model import Embedder, resolve_model_path
from rayembed.model.layout import model_revision


def test_a_model_on_s3_is_fetched_once_and_refetched_when_it_changes(
    tiny_model: Path, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAYEMBED_MODEL_CACHE", str(tmp_path / "cache"))
    uri = "s3://rayembed/models/remote-tiny"
    upload_dir(tiny_model, uri, s3_endpoint)
    got: list[Path] = []
    threads = [
        threading.Thread(target=lambda: got.append(resolve_model_path(uri, s3_endpoint))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and len(got) == 4  # four callers, one copy
    local = got[0]
    assert model_revision(local) == model_revision(tiny_model)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == sorted(
        [local.name, f"{local.name}.complete", f"{local.name}.lock"]
    )
    stamp = (local / "config.json").stat().st_mtime_ns
    assert (
        resolve_model_path(uri, s3_endpoint) == local and (local / "config.json").stat().st_mtime_ns == stamp
    )
    texts = ["fetched once per node"]
    np.testing.assert_allclose(
        Embedder.load(local, device="cpu").encode(texts),
        Embedder.load(tiny_model, device="cpu").encode(texts),
    )
    upload_dir(build_tiny(tmp_path / "other", seed=3), uri, s3_endpoint)  # the model at that path changes
    changed = resolve_model_path(uri, s3_endpoint)
    assert changed != local and model_revision(changed) != model_revision(local)


def test_a_missing_model_on_s3_is_a_clear_error(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAYEMBED_MODEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="expected a folder with config.json on S3"):
        resolve_model_path("s3://rayembed/models/nothing-here", s3_endpoint)
