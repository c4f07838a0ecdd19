"""RoPE scaling (model/rope.py): a rotary-position model read past the positions it was trained on, set in
the embed job and the endpoint, gives exactly what transformers gives when the model's config.json asks
for the same scaling (the way model cards tell users to do it), in the batch job and online alike; what
cannot be scaled is refused with the reason."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pytest

from conftest import DATA
from rayembed.config import EmbedConfig
from rayembed.model import Embedder
from rayembed.serve.api import Job
from rayembed.serve.config import ServeConfig
from rayembed.serve.engine import ModelEngine

YARN = {"rope_type": "yarn", "factor": 4}


def _long_text(words: int = 900) -> str:
    rows = [
        json.loads(x)["text"] for x in (DATA / "wikitext-2" / "paragraphs.jsonl").read_text().splitlines()
    ]
    return " ".join(" ".join(rows).split()[:words])


def _as_the_model_card_says(path: Path, to: Path, scaling: dict[str, Any]) -> Path:
    """A copy of the model whose config.json itself asks for `scaling` (on its full-attention layers
    where layers have their own RoPE), with its positions raised to match."""
    shutil.copytree(path, to)
    config = json.loads((to / "config.json").read_text())
    rope = config["rope_parameters"]
    target = rope.get("full_attention", rope)
    positions = config["max_position_embeddings"]
    target |= {**scaling, "factor": float(scaling["factor"]), "original_max_position_embeddings": positions}
    config["max_position_embeddings"] = int(positions * scaling["factor"])
    (to / "config.json").write_text(json.dumps(config))
    return to


@pytest.mark.parametrize(
    "family,scaling", [("qwen3", {"rope_type": "linear", "factor": 4}), ("qwen3", YARN), ("gemma3", YARN)]
)
def test_scaled_rope_is_what_the_models_own_config_would_give(
    tiny_decoder: Any, tmp_path: Path, family: str, scaling: dict[str, Any]
) -> None:
    path = tiny_decoder(family)  # 512 positions
    text = _long_text()
    plain = Embedder.load(path, device="cpu")
    with pytest.raises(ValueError, match="max_length must be in 1..512"):
        plain.set_max_length(2048)
    scaled = Embedder.load(path, device="cpu").set_rope_scaling(scaling).set_max_length(2048)
    n = len(scaled.tokenize_ids([text]).ids[0])
    assert 512 < n <= 2048 and scaled.tokenize_ids([text]).truncated == [False]
    card = Embedder.load(_as_the_model_card_says(path, tmp_path / "card", scaling), device="cpu")
    np.testing.assert_allclose(scaled.encode([text]), card.set_max_length(2048).encode([text]), atol=1e-6)
    if family == "qwen3":  # every layer attends in full: the scaling changes even a short text's vector
        short = ["a short text well inside the trained positions"]
        assert not np.allclose(scaled.encode(short), plain.encode(short), atol=1e-4)


def test_what_cannot_be_scaled_is_refused_with_the_reason(tiny_decoder: Any, tiny_model: Path) -> None:
    with pytest.raises(
        ValueError, match="bert has learned positions and stops at its max_position_embeddings"
    ):
        Embedder.load(tiny_model, device="cpu").set_rope_scaling(YARN)
    model = Embedder.load(tiny_decoder("qwen3"), device="cpu").set_rope_scaling(YARN)
    with pytest.raises(ValueError, match=r"scaled already \(yarn, factor 4.0\): its 2048 positions"):
        model.set_rope_scaling(YARN)
    for bad, message in (
        ({"rope_type": "dynamic", "factor": 4}, r"rope_type \(linear \| yarn\)"),
        ({"rope_type": "yarn", "factor": 1}, "factor must be a number > 1"),
        ({"rope_type": "yarn", "factor": 4, "beta": 2}, "rope_scaling takes rope_type"),
        ("yarn", "rope_scaling must be a mapping"),
    ):  # refused by the configs, before anything loads
        with pytest.raises(ValueError, match=message):
            EmbedConfig(input="in", output="out", rope_scaling=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=message):
            ServeConfig(models=[{"name": "m", "model": "default", "rope_scaling": bad}])


@pytest.mark.usefixtures("ray_local")
def test_the_embed_job_and_the_endpoint_read_whole_documents_past_the_trained_positions(
    tiny_decoder: Any, tmp_path: Path
) -> None:
    """Documents of ~800-1,800 tokens through a 512-position decoder stretched 4x: the job cuts nothing and
    writes what the scaled model encodes, the endpoint answers the same vector, and an incremental run
    with another scaling than its base's is refused."""
    from rayembed.embed import embed

    path = tiny_decoder("qwen3")
    lake = tmp_path / "lake"
    lake.mkdir()
    docs = {"a": _long_text(900), "b": _long_text(400), "c": "a short one"}
    (lake / "docs.jsonl").write_text(
        "".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items())
    )
    cfg = EmbedConfig(input=str(lake), output=str(tmp_path / "v1"), model=str(path), rope_scaling=YARN,
                      max_length=2048, progress=False)  # fmt: skip
    summary = embed(cfg)
    assert summary["rows"] == 3 and summary["truncated"] == 0
    rows = {r["id"]: r for r in pads.dataset(tmp_path / "v1").to_table().to_pylist()}
    model = Embedder.load(path, device="cpu").set_rope_scaling(YARN).set_max_length(2048)
    want = model.encode(list(docs.values()))
    np.testing.assert_allclose(np.stack([rows[k]["embedding"] for k in docs]), want, atol=1e-5)
    assert len(model.tokenize_ids([docs["a"]]).ids[0]) > 512  # past the trained positions, and whole

    serve = ServeConfig(model=str(path), rope_scaling=YARN, max_length=2048)
    engine = ModelEngine(serve.specs()[0], serve)
    assert engine.describe()["rope_scaling"] == YARN
    online = asyncio.run(engine.embed(Job(texts=[docs["a"]]))).vectors
    np.testing.assert_allclose(online, want[:1], atol=1e-5)

    with pytest.raises(ValueError, match="other settings.*rope_scaling"):
        embed(dataclasses.replace(cfg, output=str(tmp_path / "v2"), incremental_from=str(tmp_path / "v1"),
                                  rope_scaling={"rope_type": "linear", "factor": 4}))  # fmt: skip
