"""One `@dataclass` per job, a docstring per field, checks in `__post_init__`.

Specs (YAML) are read and overridden by `key=value` in `rayembed.spec`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def shared_data_dir() -> str:
    """Where the public data sets live: $RAYEMBED_DATA, else the first `shared/data` found beside the
    checkout, the working folder, or /work (this machine's layout)."""
    if os.environ.get("RAYEMBED_DATA"):
        return os.environ["RAYEMBED_DATA"]
    here = Path(__file__).resolve().parents[3]
    for candidate in (
        here / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
        Path("/work/shared/data"),
    ):
        if candidate.is_dir():
            return str(candidate)
    return str(here / "shared" / "data")


SHARED_DATA = shared_data_dir()
os.environ.setdefault("RAYEMBED_DATA", SHARED_DATA)  # specs say ${RAYEMBED_DATA}/scifact etc.


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
        _check(self.kind in ("snli", "beir"), f"prepare kind must be snli or beir, got {self.kind!r}")
        _check(self.limit is None or self.limit >= 1, "limit must be >= 1")


@dataclass
class TrainConfig:
    data: str
    """JSONL/Parquet file or folder (local or s3://). Contrastive: query/positive[/negative] columns;
    distill: a text column."""
    output_dir: str
    """Run folder, local or s3://: the final model goes to <output_dir>/model (sentence-transformers layout)."""
    model: str = "default"
    """Model to start from: a local folder or 'default' (bundled all-MiniLM-L6-v2)."""
    storage_path: str | None = None
    """Ray Train storage for checkpoints (local folder or s3://); default: <output_dir>/checkpoints."""
    run_name: str = "rayembed-train"
    """Run name under storage_path; rerunning with the same name resumes from its latest checkpoint."""
    num_workers: int = 2
    """Ray Train workers (one GPU each when use_gpu)."""
    use_gpu: bool = False
    """Run on GPUs (nccl); otherwise CPU workers (gloo)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1, 2 or 3."""
    precision: str = "fp32"
    """Training precision: fp32, bf16 or fp16 (fp16 only on GPU)."""
    loss: str = "infonce"
    """Loss name from rayembed.losses.LOSSES: infonce, symmetric_infonce, hard_infonce (query/positive
    pairs), gist, score_distill (pairs plus the in-loop `teacher`) or distill (texts plus a teacher)."""
    scale: float = 20.0
    """Logit scale (1 / temperature) of the contrastive, GIST and score-distillation losses."""
    learnable_scale: bool = False
    """symmetric_infonce: train the scale (CLIP; from `scale`, clamped at 100) with its own AdamW at
    `scale_lr`; its gradient is averaged over workers, it is reported as `scale` and kept in checkpoints."""
    scale_lr: float = 1e-3
    """Learning rate of a learnable scale (on log scale)."""
    gist_margin: float = 0.0
    """GIST: in-batch negatives the guide (`teacher`) scores above the positive's guide score minus this
    are masked."""
    student_layers: list[int] | None = None
    """Initialise the trained model from these transformer layers of `model` (e.g. [0, 2, 5]: a 3-layer
    student from MiniLM-L6's layers); the exported model has only these layers."""
    teacher: str | None = None
    """Teacher model run inside the training loop (no grad): distill's teacher (unless teacher_column),
    GIST's guide, score_distill's scorer."""
    teacher_column: str | None = None
    """Distillation: column of precomputed teacher embeddings (e.g. `rayembed embed` output of the teacher
    with the text passed through); replaces running `teacher` in the loop."""
    distill_alignment: str = "cosine"
    """Distillation alignment term: cosine or mse."""
    kl_weight: float = 1.0
    """Weight of the similarity-matrix KL term in distillation."""
    temperature: float = 0.05
    """Temperature of the similarity-matrix KL term."""
    spread_out_weight: float = 0.0
    """Weight of the spread-out (global orthogonal) regulariser on the full-width embeddings
    (EmbeddingGemma; helps quantised embeddings stay apart); 0 disables it."""
    matryoshka_dims: list[int] = field(default_factory=list)
    """Train every prefix width in this list (empty: full width only)."""
    matryoshka_weights: list[float] | None = None
    """Weights of the Matryoshka widths (default 1 each)."""
    pca_rotation: bool = False
    """Matryoshka from a model not trained for it: before training, add an orthogonal output layer (a
    sentence-transformers Dense) set to the principal axes of the vectors the model learns to match
    (distill: the teacher's; otherwise its own embeddings of the first `pca_rows` rows), and rotate
    teacher vectors alike. Full-width similarities stay as they were while every prefix starts with the
    most variance it can hold (rayembed.pca; all-MiniLM-L6-v2 on SciFact, 128-d: 93.3% of full nDCG@10
    as it is, 97.6% rotated). The rotation is kept in checkpoints, so a resumed run uses the same one."""
    pca_rows: int = 4096
    """Rows read to fit `pca_rotation`: their teacher_column vectors, or else their texts embedded on the
    driver (a one-off cost before the workers start; a few thousand vectors fit 384 axes well)."""
    matryoshka_2d: list[list[int]] = field(default_factory=list)
    """2D Matryoshka (Starbucks): [layers, dim] pairs, e.g. [[2, 128], [4, 256]]; each trains the model's
    first `layers` layers, pooled, at width `dim`, with the same loss (weight 1), besides the full model.
    Cut such a sub-model out of the exported model with `Embedder.keep_layers(range(layers))`."""
    query_column: str = "query"
    """Contrastive: query text column."""
    positive_column: str = "positive"
    """Contrastive: positive document column."""
    negative_column: str | None = None
    """Contrastive: optional hard-negative column."""
    text_column: str = "text"
    """Distillation: text column."""
    batch_size: int = 32
    """Rows per worker per step; negatives are gathered across workers (global batch = workers x this)."""
    grad_cache_chunk: int | None = None
    """GradCache: embed the batch in chunks of this many rows (must divide batch_size), so activation
    memory follows the chunk while the loss still sees the whole (gathered) batch; gradients are exact."""
    max_length: int | None = None
    """Token limit while training (default: the model's max_seq_length); the exported model keeps its own."""
    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    epochs: int = 1
    """Passes over the data."""
    shuffle_buffer: int = 0
    """Rows each worker shuffles its stream in (seeded per epoch); 0 keeps file order. Resuming mid-epoch
    skips as many batches as were trained, which with shuffling are the same rows only if blocks arrive in
    the same order."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total."""
    checkpoint_every: int = 50
    """Report a checkpoint every N steps (and always at the end)."""
    report_interval_s: float = 5.0
    """Seconds between metric reports to Ray Train, at least (checkpoints are always reported; every
    step's loss still goes to the run's history). Ray Train takes about one report per 2 s (a queue of
    one, polled every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so reporting every step held a GPU to
    0.5 steps/s (docs/benchmarks.md). 0: every step."""
    keep_checkpoints: int = 2
    """Checkpoints kept by Ray Train."""
    max_failures: int = 0
    """Worker failures Ray Train recovers from (restarting from the latest checkpoint)."""
    seed: int = 0
    """Random seed."""
    eval: dict[str, Any] | None = None
    """Eval settings (EvalConfig fields: beir_dir, sts_file, max_queries, dims, precisions, ...) applied to
    the model before and after training, for the run report; null: the report has the curves only."""

    def __post_init__(self) -> None:
        from rayembed.losses import GUIDED, LOSSES

        if self.eval is not None:
            EvalConfig(**self.eval)  # unknown or bad eval settings fail here, not after training

        _check(self.zero_stage in (1, 2, 3), f"zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        _check(
            self.precision in ("fp32", "bf16", "fp16"),
            f"precision must be fp32|bf16|fp16, got {self.precision}",
        )
        _check(self.precision != "fp16" or self.use_gpu, "fp16 needs use_gpu=true; use bf16 or fp32 on CPU")
        _check(self.loss in LOSSES, f"loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        _check(
            self.loss != "distill" or bool(self.teacher or self.teacher_column),
            "loss=distill needs a teacher model or a teacher_column",
        )
        _check(
            self.loss not in GUIDED or bool(self.teacher),
            f"loss={self.loss} needs a teacher model (the guide / scorer run in the loop)",
        )
        _check(
            self.loss not in GUIDED or not self.negative_column,
            f"loss={self.loss} takes query/positive pairs: no negative_column",
        )
        _check(
            not self.learnable_scale or self.loss == "symmetric_infonce",
            "learnable_scale needs loss=symmetric_infonce",
        )
        _check(
            self.grad_cache_chunk is None
            or (self.grad_cache_chunk >= 1 and self.batch_size % self.grad_cache_chunk == 0),
            f"grad_cache_chunk must divide batch_size ({self.batch_size}), got {self.grad_cache_chunk}",
        )
        _check(self.num_workers >= 1 and self.batch_size >= 1, "num_workers and batch_size must be >= 1")
        _check(self.epochs >= 1 and self.checkpoint_every >= 1, "epochs and checkpoint_every must be >= 1")
        _check(self.report_interval_s >= 0, "report_interval_s must be >= 0")
        _check(self.shuffle_buffer >= 0, "shuffle_buffer must be >= 0")
        _check(self.pca_rows >= 2, "pca_rows must be >= 2 (vectors to fit the rotation)")
        _check(all(k > 0 for k in self.matryoshka_dims), "matryoshka_dims must be positive")
        _check(
            all(len(p) == 2 and min(p) >= 1 for p in self.matryoshka_2d),
            f"matryoshka_2d must be [layers, dim] pairs of positive ints, got {self.matryoshka_2d}",
        )
        _check(
            self.matryoshka_weights is None or len(self.matryoshka_weights) == len(self.matryoshka_dims),
            "matryoshka_weights must have one weight per dim",
        )
        # Ray Train workers run in their own folders: local paths must be absolute.
        self.data, self.output_dir = local_abspath(self.data), local_abspath(self.output_dir)
        self.storage_path = local_abspath(self.storage_path or f"{self.output_dir.rstrip('/')}/checkpoints")


@dataclass
class EmbedConfig:
    input: str
    """Input JSONL/Parquet file or folder, local or s3://."""
    output: str
    """Output folder (Parquet + _manifest.json, _committed/, _rejects/, _summary.json), local or s3://."""
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
    overwrite: bool = False
    """Delete what the output folder holds first (otherwise a rerun resumes; other settings are refused)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        self.input, self.output = (
            local_abspath(self.input).rstrip("/"),
            local_abspath(self.output).rstrip("/"),
        )
        _check(
            self.precision in ("float32", "int8", "binary"),
            f"precision must be float32|int8|binary, got {self.precision!r}",
        )
        _check(
            self.gpu_dtype in ("float16", "bfloat16", "float32"),
            f"gpu_dtype must be float16|bfloat16|float32, got {self.gpu_dtype!r}",
        )
        _check(
            self.cpu_dtype in ("float32", "bfloat16"),
            f"cpu_dtype must be float32|bfloat16, got {self.cpu_dtype!r}",
        )
        _check(self.dim is None or self.dim > 0, "dim must be positive")
        _check(
            min(self.batch_size, self.chunk_rows, self.fragment_rows, self.fragment_bytes) >= 1,
            "batch_size, chunk_rows, fragment_rows, fragment_bytes must be >= 1",
        )
        _check(
            bool(self.output) and self.input != self.output, "output must be a folder other than the input"
        )


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
        self.pairs, self.corpus, self.output = (
            local_abspath(p).rstrip("/") for p in (self.pairs, self.corpus, self.output)
        )
        _check(self.index in ("exact", "faiss"), f"index must be exact or faiss, got {self.index!r}")
        _check(self.top_k >= 1 and self.num_negatives >= 1, "top_k and num_negatives must be >= 1")
        _check(0 <= self.skip_top < self.top_k, "skip_top must be in [0, top_k)")


@dataclass
class MergeConfig:
    models: list[str]
    """Models to average: sentence-transformers folders, or DeepSpeed checkpoint folders of a run."""
    output: str
    """Folder for the merged model (sentence-transformers layout)."""
    weights: list[float] | None = None
    """One weight per model (default: uniform soup)."""
    base: str | None = None
    """Architecture and tokenizer (default: the first model; needed when merging DeepSpeed checkpoints)."""
    name: str | None = None
    """Name of the merged model (default: <base name>-soup<N>)."""
    eval: dict[str, Any] | None = None
    """Eval settings (EvalConfig fields) applied to every ingredient and the soup (merge_report.md/.json)."""

    def __post_init__(self) -> None:
        _check(len(self.models) >= 1, "merge needs at least one model")
        if self.eval is not None:
            EvalConfig(**self.eval)  # bad eval settings fail before any merging
        _check(
            self.weights is None or len(self.weights) == len(self.models),
            "weights must have one weight per model",
        )
        _check(
            self.weights is None or (min(self.weights) >= 0 and sum(self.weights) > 0),
            "weights must be >= 0, not all 0",
        )


@dataclass
class EvalConfig:
    model: str = "default"
    """Model folder or 'default'."""
    beir_dir: str | None = f"{SHARED_DATA}/scifact"
    """BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); null to skip."""
    split: str = "test"
    """qrels split."""
    sts_file: str | None = f"{SHARED_DATA}/stsbenchmark/stsbenchmark/sts-test.csv"
    """STS Benchmark CSV; null to skip."""
    max_queries: int | None = None
    """Evaluate at most this many queries (subset for quick runs)."""
    max_docs: int | None = None
    """Keep every judged document plus distractors up to this many (subset for quick runs)."""
    dims: list[int] = field(default_factory=list)
    """Also evaluate these Matryoshka widths."""
    precisions: list[str] = field(default_factory=lambda: ["float32"])
    """Evaluate each width at these output precisions (float32, int8, binary: as `rayembed embed` writes)."""
    batch_size: int = 64
    """Rows per model call."""
    output: str | None = None
    """Write the metrics JSON here."""

    def __post_init__(self) -> None:
        _check(bool(self.beir_dir or self.sts_file), "eval needs beir_dir or sts_file")
        _check(
            bool(self.precisions) and set(self.precisions) <= {"float32", "int8", "binary"},
            f"precisions must be a non-empty list of float32|int8|binary, got {self.precisions}",
        )
        _check(
            "binary" not in self.precisions or all(d % 8 == 0 for d in self.dims),
            "binary precision needs dims divisible by 8",
        )


@dataclass
class ServeConfig:
    model: str = "default"
    """Model folder or 'default'."""
    model_name: str | None = None
    """Name clients pass as `model` (default: the model's own name)."""
    host: str = "127.0.0.1"
    """HTTP bind address."""
    port: int = 8000
    """HTTP port."""
    max_batch_tokens: int = 16384
    """Token budget of one model call: inputs of concurrent requests are merged up to this many tokens."""
    max_batch_inputs: int = 256
    """Most inputs in one model call."""
    batch_wait_timeout_s: float = 0.005
    """Longest an idle model's batch waits for requests already being parsed/tokenized to join (it
    starts as soon as none is; a busy model's next batch never waits)."""
    max_inputs_per_request: int = 2048
    """Inputs allowed in one request (more: 400)."""
    max_body_bytes: int = 8 << 20
    """Largest request body (more: 413)."""
    truncate: bool = True
    """Inputs longer than the model's max length: truncate (true) or refuse with 400 (false)."""
    api_keys_file: str | None = None
    """File of accepted API keys, one per line (also $RAYEMBED_API_KEYS, comma-separated); none: open."""
    max_queued_inputs: int = 16384
    """Inputs waiting in one replica's batcher before requests get 429."""
    max_ongoing_requests: int = 64
    """Requests one replica works on at once (Ray Serve)."""
    max_queued_requests: int = 256
    """Requests waiting for a replica before Serve answers 503 (-1: unbounded)."""
    min_replicas: int = 1
    """Autoscaling lower bound."""
    max_replicas: int = 2
    """Autoscaling upper bound."""
    target_ongoing_requests: float = 8
    """Autoscaling target of in-flight requests per replica."""
    upscale_delay_s: float = 10.0
    """How long load must stay high before a replica is added."""
    downscale_delay_s: float = 60.0
    """How long load must stay low before a replica is removed."""
    look_back_period_s: float = 30.0
    """Window over which ongoing requests are averaged for autoscaling."""
    num_cpus: float = 1
    """CPUs per replica."""
    num_gpus: float = 0
    """GPUs per replica."""
    torch_threads: int | None = None
    """Torch threads per replica (default: torch's choice)."""
    dtype: str = "float32"
    """Model dtype: float32, bfloat16, or float16 (GPU only). Match the embed job's cpu_dtype/gpu_dtype
    for the same vectors online as in batch."""

    def __post_init__(self) -> None:
        _check(1 <= self.min_replicas <= self.max_replicas, "need 1 <= min_replicas <= max_replicas")
        _check(
            self.dtype in ("float32", "bfloat16") or (self.dtype == "float16" and self.num_gpus > 0),
            f"dtype must be float32|bfloat16 (or float16 with num_gpus > 0), got {self.dtype!r}",
        )
        _check(
            min(
                self.max_batch_tokens, self.max_batch_inputs, self.max_inputs_per_request, self.max_body_bytes
            )
            >= 1,
            "batch and request limits must be >= 1",
        )
        _check(
            self.max_queued_inputs >= self.max_inputs_per_request,
            "max_queued_inputs must hold one full request",
        )


def local_abspath(path: str) -> str:
    """Absolute form of a local path; URIs (s3://...) unchanged."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)
