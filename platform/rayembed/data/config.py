"""`prepare` job settings."""

from __future__ import annotations

from dataclasses import dataclass

from rayembed.settings import check


@dataclass
class PrepareConfig:
    kind: str
    """'snli' (query/positive/negative triples from e-SNLI), 'beir' (query/positive pairs from qrels) or
    'random_model' (a random-weight model of `family` and `size`, for CPU runs of LLM recipes)."""
    output: str
    """JSONL file to write (random_model: the model folder)."""
    source: str | None = None
    """Source folder: e-SNLI s1/s2/labels files, or a BEIR folder."""
    split: str = "dev"
    """Source split (snli: dev|test; beir: a qrels split)."""
    limit: int | None = None
    """Write at most this many rows."""
    family: str | None = None
    """random_model: llama, mistral, qwen2, qwen3, gemma or gemma3."""
    size: str = "tiny"
    """random_model: tiny (2 layers, hidden 64), 0.5b (Qwen2-0.5B's shape) or 0.4b (its layers with a
    32k vocabulary)."""
    pooling: str = "lasttoken"
    """random_model: the model's pooling."""

    def __post_init__(self) -> None:
        from rayembed.model.random_models import FAMILIES, SIZES

        check(
            self.kind in ("snli", "beir", "random_model"),
            f"prepare kind must be snli, beir or random_model, got {self.kind!r}",
        )
        check(self.limit is None or self.limit >= 1, "limit must be >= 1")
        check(
            self.kind == "random_model" or bool(self.source),
            f"prepare kind={self.kind} needs a source folder",
        )
        check(
            self.kind != "random_model" or (self.family in FAMILIES and self.size in SIZES),
            f"random_model needs family in {sorted(FAMILIES)} and size in {sorted(SIZES)}",
        )
