"""`prepare` job settings."""

from __future__ import annotations

from dataclasses import dataclass

from rayembed.settings import check


@dataclass
class PrepareConfig:
    kind: str
    """'snli' (query/positive/negative triples from e-SNLI) or 'beir' (query/positive pairs from qrels)."""
    source: str
    """Source folder: e-SNLI s1/s2/labels files, or a BEIR folder."""
    output: str
    """JSONL file to write."""
    split: str = "dev"
    """Source split (snli: dev|test; beir: a qrels split)."""
    limit: int | None = None
    """Write at most this many rows."""

    def __post_init__(self) -> None:
        check(self.kind in ("snli", "beir"), f"prepare kind must be snli or beir, got {self.kind!r}")
        check(self.limit is None or self.limit >= 1, "limit must be >= 1")
