"""`prepare` job settings."""

from __future__ import annotations

from dataclasses import dataclass

from rayembed.settings import check

KINDS = ("snli", "beir", "general", "nli_retrieval", "random_model", "articles")


@dataclass
class PrepareConfig:
    kind: str
    """'snli' (query/positive/negative triples from e-SNLI), 'beir' (query/positive pairs from qrels),
    'general' (id/source/text rows of general-domain text to distill on: rayembed.data.mix),
    'nli_retrieval' (a BEIR folder from e-SNLI: premise -> entailed hypotheses), 'random_model' (a
    random-weight model of `family` and `size`, for CPU runs of LLM recipes) or 'articles' (whole
    Wikipedia articles, id/title/text, from the shared data folder's wikitext-2: long documents)."""
    output: str
    """JSONL file to write (nli_retrieval: the BEIR folder; random_model: the model folder); local or s3://."""
    source: str | None = None
    """Source folder, local or s3://: e-SNLI s1/s2/labels files, a BEIR folder, or (general, articles) the
    shared data folder."""
    split: str = "dev"
    """Source split (snli, nli_retrieval: dev|test; beir: a qrels split)."""
    sentences: int = 6000
    """general: Wikipedia sentences sampled besides the paragraphs (query-like text)."""
    seed: int = 0
    """general: seed of the sentence sample and of the shuffle."""
    corpus: str | None = None
    """general: JSONL file (or folder of *.jsonl) of the corpus the student will embed, or of other text of
    its kind; the `text` (and `title`) of its first `corpus_rows` rows join the mix as source 'corpus'.
    Documents only: no queries, no labels (docs/benchmarks.md "Text of the corpus to embed")."""
    corpus_rows: int = 20000
    """general: at most this many corpus rows, read from the start."""
    limit: int | None = None
    """Write at most this many rows."""
    family: str | None = None
    """random_model: llama, mistral, qwen2, qwen3, gemma or gemma3."""
    size: str = "tiny"
    """random_model: tiny (2 layers, hidden 64), 0.5b (Qwen2-0.5B's shape) or 0.4b (its layers with a
    32k vocabulary)."""
    pooling: str = "lasttoken"
    """random_model: the model's pooling."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint for s3:// `source`, `corpus` and `output` (default: $AWS_ENDPOINT_URL, else AWS)."""

    def __post_init__(self) -> None:
        from rayembed.model.random_models import FAMILIES, SIZES

        check(self.kind in KINDS, f"prepare kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        check(self.limit is None or self.limit >= 1, "limit must be >= 1")
        check(self.sentences >= 0, "sentences must be >= 0")
        check(self.corpus_rows >= 1, "corpus_rows must be >= 1")
        check(self.corpus is None or self.kind == "general", "corpus applies to prepare kind=general")
        check(
            self.kind == "random_model" or bool(self.source),
            f"prepare kind={self.kind} needs a source folder",
        )
        check(
            self.kind != "random_model" or (self.family in FAMILIES and self.size in SIZES),
            f"random_model needs family in {sorted(FAMILIES)} and size in {sorted(SIZES)}",
        )
