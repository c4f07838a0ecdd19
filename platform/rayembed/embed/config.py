"""`embed` and `mine` job settings: one `@dataclass` each, a docstring per field, checks in
`__post_init__`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rayembed.io import dated, local_abspath
from rayembed.model.layout import model_ref
from rayembed.model.rope import check_rope_scaling
from rayembed.settings import build, check
from rayembed.tracking import TrackingConfig


@dataclass
class EmbedConfig:
    input: str
    """Input JSONL/Parquet file or folder, local or s3:// (input_format files); an Iceberg table's
    identifier, namespace.table (iceberg); a Delta table's folder, local or s3:// (delta)."""
    output: str
    """Output folder (Parquet + _manifest.json, _committed/, _rejects/, _summary.json), local or s3://;
    `{date}` in it becomes today's UTC date (YYYY-MM-DD): a folder per night, a rerun the same day resumes."""
    model: str = "default"
    """Model folder or 'default'."""
    text_column: str = "text"
    """Column with the text to embed."""
    title_column: str | None = None
    """Optional title column, prepended to the text (BEIR style: title + ' ' + text)."""
    id_column: str = "id"
    """Column with a unique id per row; copied to the output."""
    passthrough_columns: list[str] = field(default_factory=list)
    """Input columns copied unchanged to the output."""
    partition_by: str | None = None
    """Write hive-style subfolders <column>=<value>/ by this input column."""
    dim: int | None = None
    """Matryoshka output width (default: full)."""
    precision: str = "float32"
    """Output precision: float32, int8 or binary."""
    prompt_name: str | None = None
    """One of the model's prompts (e.g. 'document') to prefix every text with."""
    max_length: int | None = None
    """Most tokens of a text the model reads (default: the model's own, from its folder): a long-context
    model may be raised to its positions (e.g. 32768) to embed whole documents without chunking; memory
    stays bounded by `max_tokens` (a text longer than it is embedded alone)."""
    rope_scaling: dict[str, Any] | None = None
    """Stretch a RoPE model's positions past what it was trained on, as its model card's config.json would:
    {rope_type: linear | yarn, factor: > 1, original_max_position_embeddings: optional (default: the
    model's positions)}; then `max_length` may go up to positions x factor. Models with learned positions
    (BERT) are refused. The endpoint's `rope_scaling` must match for the same vectors."""
    chunking: str | None = None
    """Long texts as passages (docs/embedding.md "Long documents"): None, one vector per row, its text
    cut at the model's max length (counted in `truncated`); `chunks`, each chunk of the text embedded on
    its own (what `Embedder.encode` gives that chunk's text); `late`, late chunking: the whole text run
    through the model in windows of its max length, each chunk's vector the mean of its own tokens'
    states (mean-pooling models). Output: one row per chunk, with `chunk`, `start`, `end` (the chunk is
    text[start:end]) and `tokens`."""
    chunk_tokens: int | None = None
    """Most tokens per chunk, counted by the model's own tokenizer (default: as many as the model's window
    takes, less its special tokens and prompt)."""
    chunk_overlap: int = 0
    """Tokens consecutive chunks of a text share."""
    chunk_boundary: str = "sentence"
    """Where a chunk prefers to end, within the second half of its token budget: at a `paragraph` start,
    a `sentence` start (or paragraph), else a word start; `token`: word starts only."""
    batch_size: int = 64
    """Most rows per model call."""
    max_tokens: int | None = 16384
    """Most padded tokens per model call (length-bucketed batches)."""
    chunk_rows: int = 4096
    """Rows read, sorted by length and embedded together (the length-bucketing window)."""
    fragment_rows: int = 100_000
    """Parquet row groups are grouped into fragments of at least this many rows (units of exactly-once work)."""
    fragment_bytes: int = 128 << 20
    """JSONL files bigger than this are split into line-aligned byte ranges of this size (units of
    exactly-once work that actors share); smaller files are one fragment each."""
    num_actors: int | None = None
    """Embedding actors (default: one per GPU, or CPUs / threads_per_actor)."""
    threads_per_actor: int | None = None
    """CPUs reserved per actor, used as torch and tokenizer threads. CPU actors: default 1, as more
    one-thread actors beat fewer multi-thread ones; more when there are fewer fragments than free CPUs;
    capped by the smallest node. GPU actors: default the node's CPUs per GPU, up to 8."""
    use_gpu: bool | None = None
    """One embedding actor per GPU (default: when the cluster has GPUs)."""
    gpu_dtype: str = "float16"
    """Model dtype on GPU actors: float16, bfloat16 or float32."""
    cpu_dtype: str = "float32"
    """Model dtype on CPU actors: float32 or bfloat16 (~2.5x faster on CPUs with AVX512-BF16 or AMX,
    vectors within cosine 0.9995 of float32; docs/benchmarks.md). Serve with the same dtype for the
    same vectors online."""
    s3_endpoint_url: str | None = None
    """Endpoint of an S3-compatible store (default: AWS, or $AWS_ENDPOINT_URL)."""
    store_retries: int = 5
    """A fragment whose output the store refuses past the S3 client's own retries (an outage, sustained
    throttling) is redone from scratch up to this many times, after 2, 4, 8, ... s (exactly-once holds:
    nothing of it is visible before its commit); the summary counts them (`store_retries`)."""
    overwrite: bool = False
    """Delete what the output folder holds first (otherwise a rerun resumes; other settings are refused)."""
    input_format: str = "files"
    """files, iceberg (the current snapshot's data files, through `iceberg_catalog`) or delta (the
    current version's data files)."""
    iceberg_catalog: dict[str, Any] = field(default_factory=dict)
    """pyiceberg catalog properties, e.g. {type: sql, uri: sqlite:////data/catalog.db, warehouse:
    s3://bucket/wh, s3.endpoint: ...}; or {type: rest, uri: ...} / {type: glue}."""
    snapshot: int | None = None
    """input_format iceberg or delta: read this snapshot id (Iceberg) or version (Delta) instead of the
    current one. How a killed run resumes after its table moved on: the refusal names the snapshot the
    run pinned (docs/deploy.md "Recovering a nightly run")."""
    iceberg_append: str | None = None
    """Also keep this Iceberg table (namespace.table, created if missing) of `iceberg_catalog` at the
    output's view, in one commit tagged with the output (a rerun does not apply twice): a full run appends
    its rows; with `incremental_from`, the changed rows replace theirs and deleted ids leave the table (a
    table at another version than the base is replaced by the whole view)."""
    incremental_from: str | None = None
    """A previous output of this job (full or incremental): embed only rows whose id is new or whose text
    changed (content hash), and record the ids that are gone (`_deleted.parquet`). The previous output and
    this one together hold every current id exactly once: `rayembed.embed.versions.current` reads them.
    `latest`: the newest finished version in the output's parent folder (a full run if there is none):
    with `output: .../{date}`, the nightly recipe (jobs/embed-nightly.yaml)."""
    bucket_ids: int = 4_000_000
    """Incremental runs: at most this many ids (on average) per range of the comparison with the previous
    view (embed/keys.py); a task holds one range: ~250 MB a million ids measured (~1 GB at the default)
    beside the worker's own ~600 MB."""
    snapshot_diff: bool = True
    """Incremental runs over a table: read only the data files added since the base's Iceberg snapshot or
    Delta version (ids can only have gone from the files removed since), while that snapshot is in the
    table's history (Delta: its log); otherwise (false, files, an expired snapshot) every row is read and
    its content hash compared. The summary's `change_detection` says which ran."""
    change_feed: bool = True
    """With `snapshot_diff`, a Delta table whose `delta.enableChangeDataFeed` is true: read only the rows its
    change data feed lists since the base's version (inserted, updated, deleted; embed/feed.py), not the
    whole files a one-row update rewrote; false: the log's file diff."""
    progress: bool = True
    """Show a progress bar."""
    tracking: dict[str, Any] | None = None
    """Log the settings as params and the summary as metrics into a tracked run (TrackingConfig fields),
    tagged with the registered model's run when the model is a models:/ source; null: not tracked."""

    def __post_init__(self) -> None:
        if self.tracking is not None:
            build(TrackingConfig, self.tracking)
        self.model = model_ref(self.model)  # actors run in their own folders
        formats = ("files", "iceberg", "delta")
        check(self.bucket_ids >= 1, f"bucket_ids must be >= 1, got {self.bucket_ids}")
        check(self.input_format in formats, f"input_format must be one of {formats}")
        check(
            bool(self.iceberg_catalog) or (self.input_format != "iceberg" and not self.iceberg_append),
            "input_format=iceberg and iceberg_append need iceberg_catalog (pyiceberg catalog properties)",
        )
        if self.input_format != "iceberg":  # a path; an Iceberg identifier stays as it is
            self.input = local_abspath(self.input).rstrip("/")
        self.output = local_abspath(dated(self.output))
        self.output = self.output.rstrip("/")
        if self.incremental_from and self.incremental_from != "latest":
            self.incremental_from = local_abspath(self.incremental_from).rstrip("/")
            check(self.incremental_from != self.output, "incremental_from must be another folder than output")
        check(
            self.precision in ("float32", "int8", "binary"),
            f"precision must be float32|int8|binary, got {self.precision!r}",
        )
        check(
            self.gpu_dtype in ("float16", "bfloat16", "float32"),
            f"gpu_dtype must be float16|bfloat16|float32, got {self.gpu_dtype!r}",
        )
        check(
            self.cpu_dtype in ("float32", "bfloat16"),
            f"cpu_dtype must be float32|bfloat16, got {self.cpu_dtype!r}",
        )
        check(self.dim is None or self.dim > 0, "dim must be positive")
        self._check_chunking()
        check(self.max_length is None or self.max_length >= 1, "max_length must be >= 1")
        check_rope_scaling(self.rope_scaling)
        check(
            not (self.chunking and self.title_column),
            "chunking cuts the text column alone (start/end index it): pass the title through "
            "(passthrough_columns) or join it to the text first, instead of title_column",
        )
        check(
            min(self.batch_size, self.chunk_rows, self.fragment_rows, self.fragment_bytes) >= 1,
            "batch_size, chunk_rows, fragment_rows, fragment_bytes must be >= 1",
        )
        check(bool(self.output) and self.input != self.output, "output must be a folder other than the input")
        check(
            self.snapshot is None or self.input_format != "files",
            "snapshot pins a table's snapshot (Iceberg) or version (Delta): input_format must be iceberg or delta",
        )
        check(self.store_retries >= 0, "store_retries must be >= 0")

    def _check_chunking(self) -> None:
        check(
            self.chunking in (None, "chunks", "late"),
            f"chunking must be null, chunks or late, got {self.chunking!r}",
        )
        check(
            self.chunk_boundary in ("paragraph", "sentence", "token"),
            f"chunk_boundary must be paragraph, sentence or token, got {self.chunk_boundary!r}",
        )
        check(
            self.chunk_overlap >= 0 and (self.chunk_tokens is None or self.chunk_overlap < self.chunk_tokens),
            "chunk_overlap must be >= 0 and less than chunk_tokens",
        )
        check(self.chunk_tokens is None or self.chunk_tokens >= 1, "chunk_tokens must be >= 1")


@dataclass
class MineConfig:
    pairs: str
    """Training pairs (JSONL/Parquet, local or s3://) with id, query and positive columns."""
    corpus: str
    """Corpus to draw negatives from (JSONL/Parquet) with id and text (and optional title) columns."""
    output: str
    """Folder: _vectors/ (the three embed runs), mined.jsonl, _rejects.jsonl, _summary.json."""
    model: str = "default"
    """Model that embeds queries, positives and corpus (normally the model about to be trained)."""
    id_column: str = "id"
    """Pairs: id column."""
    query_column: str = "query"
    """Pairs: query text column."""
    positive_column: str = "positive"
    """Pairs: positive text column."""
    corpus_id_column: str = "id"
    """Corpus: id column."""
    corpus_text_column: str = "text"
    """Corpus: text column."""
    corpus_title_column: str | None = None
    """Corpus: optional title column, embedded as "title text" (and written so in the negatives)."""
    index: str = "exact"
    """exact (blocked matrix products) or faiss (HNSW graph; approximate, for corpora too big to scan)."""
    top_k: int = 50
    """Candidates retrieved per query."""
    skip_top: int = 0
    """Ignore the first N candidates (the very top is where unlabelled positives hide)."""
    margin: float = 0.05
    """False-negative margin: drop candidates scoring above (positive score - margin) (TopK-MarginPos)."""
    num_negatives: int = 1
    """Negatives per pair; each becomes one output row (query, positive, negative)."""
    s3_endpoint_url: str | None = None
    """Endpoint of an S3-compatible store."""

    def __post_init__(self) -> None:
        self.model = model_ref(self.model)
        self.pairs, self.corpus, self.output = (
            local_abspath(p).rstrip("/") for p in (self.pairs, self.corpus, self.output)
        )
        check(self.index in ("exact", "faiss"), f"index must be exact or faiss, got {self.index!r}")
        check(self.top_k >= 1 and self.num_negatives >= 1, "top_k and num_negatives must be >= 1")
        check(0 <= self.skip_top < self.top_k, "skip_top must be in [0, top_k)")
