"""`eval` job settings: a docstring per field, checks in `__post_init__`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rayembed.data import SHARED_DATA
from rayembed.settings import build, check
from rayembed.tracking import TrackingConfig


@dataclass
class EvalConfig:
    model: str = "default"
    """Model folder (local or s3://) or 'default'."""
    document_model: str | None = None
    """An index-compatible pair's document encoder (a distillation's teacher-in-frame, recording the same
    frame as `model`): BEIR's documents are also embedded by it and scored against `model`'s queries,
    reported as `beir_pair` beside `model`'s own `beir` (the asymmetric and symmetric figures); the encoder
    alone as `beir_documents` (at full width the teacher's own figures) and the full-width nDCG@10 of
    `beir` and `beir_pair` as shares of it as `beir_retention` (student_vs_teacher, asym_vs_teacher)."""
    beir_dir: str | None = f"{SHARED_DATA}/scifact"
    """BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), local or s3://; null to skip."""
    split: str = "test"
    """qrels split."""
    sts_file: str | None = f"{SHARED_DATA}/stsbenchmark/stsbenchmark/sts-test.csv"
    """STS Benchmark CSV, local or s3://; null to skip."""
    max_queries: int | None = None
    """Evaluate at most this many queries (subset for quick runs)."""
    max_docs: int | None = None
    """Keep every judged document plus distractors up to this many (subset for quick runs)."""
    max_pairs: int | None = None
    """Evaluate at most this many STS pairs, spread evenly over the file (its genres come in blocks), for
    quick runs; the report's `sts.pairs` says how many were scored."""
    dims: list[int] = field(default_factory=list)
    """Also evaluate these Matryoshka widths."""
    precisions: list[str] = field(default_factory=lambda: ["float32"])
    """Evaluate each width at these output precisions (float32, int8, binary: as `rayembed embed` writes)."""
    query_prompt_name: str | None = None
    """One of the model's prompts put before every query (e.g. 'query' for an instruction-trained model)."""
    document_prompt_name: str | None = None
    """One of the model's prompts put before every document and STS sentence."""
    corpus: str | None = None
    """A label-free retention check on your own corpus: its documents (a JSONL file or folder of `text`
    (+ `title`) rows, what `prepare corpus=` reads), no queries or labels. With `teacher`, estimates how
    much of the teacher's nDCG@10 `model` keeps on them, symmetric and (with `document_model`) through the
    pair, from pseudo-queries made of the documents (cloze spans and documents as queries against the
    teacher's neighbours; eval/retention.py): report `retention`."""
    teacher: str | None = None
    """The teacher `model` was distilled from (the check's bar)."""
    corpus_queries: str | None = None
    """Optional real queries of the corpus, without labels (JSONL `text` rows): their top 10 by the student
    against the teacher's top 3 (`real_query_agreement`)."""
    corpus_docs: int = 3000
    """Documents of `corpus` the check searches (the first ones)."""
    pseudo_queries: int = 500
    """Pseudo-queries of each kind the check makes of them (cloze spans, documents as queries)."""
    batch_size: int = 64
    """Rows per model call."""
    output: str | None = None
    """Write the metrics JSON here (a local or s3:// file)."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint for the s3:// paths (default: $AWS_ENDPOINT_URL, else AWS)."""
    tracking: dict[str, Any] | None = None
    """Log the settings as params and the metrics into a tracked run (TrackingConfig fields); null: not."""

    def __post_init__(self) -> None:
        if self.tracking is not None:
            build(TrackingConfig, self.tracking)
        check(bool(self.beir_dir or self.sts_file or self.corpus), "eval needs beir_dir, sts_file or corpus")
        check(
            not self.corpus or bool(self.teacher), "corpus (the label-free retention check) needs the teacher"
        )
        check(self.max_pairs is None or self.max_pairs >= 2, "max_pairs must be >= 2 (a rank correlation)")
        check(min(self.corpus_docs, self.pseudo_queries) >= 1, "corpus_docs and pseudo_queries must be >= 1")
        check(
            bool(self.precisions) and set(self.precisions) <= {"float32", "int8", "binary"},
            f"precisions must be a non-empty list of float32|int8|binary, got {self.precisions}",
        )
        check(
            "binary" not in self.precisions or all(d % 8 == 0 for d in self.dims),
            "binary precision needs dims divisible by 8",
        )
