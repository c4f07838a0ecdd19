"""`train` and `merge` job settings: one `@dataclass` each, a docstring per field, checks in
`__post_init__`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rayembed.eval.config import EvalConfig
from rayembed.io import local_abspath
from rayembed.settings import check


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
        from rayembed.train.losses import GUIDED, LOSSES

        if self.eval is not None:
            EvalConfig(**self.eval)  # unknown or bad eval settings fail here, not after training

        check(self.zero_stage in (1, 2, 3), f"zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        check(
            self.precision in ("fp32", "bf16", "fp16"),
            f"precision must be fp32|bf16|fp16, got {self.precision}",
        )
        check(self.precision != "fp16" or self.use_gpu, "fp16 needs use_gpu=true; use bf16 or fp32 on CPU")
        check(self.loss in LOSSES, f"loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        check(
            self.loss != "distill" or bool(self.teacher or self.teacher_column),
            "loss=distill needs a teacher model or a teacher_column",
        )
        check(
            self.loss not in GUIDED or bool(self.teacher),
            f"loss={self.loss} needs a teacher model (the guide / scorer run in the loop)",
        )
        check(
            self.loss not in GUIDED or not self.negative_column,
            f"loss={self.loss} takes query/positive pairs: no negative_column",
        )
        check(
            not self.learnable_scale or self.loss == "symmetric_infonce",
            "learnable_scale needs loss=symmetric_infonce",
        )
        check(
            self.grad_cache_chunk is None
            or (self.grad_cache_chunk >= 1 and self.batch_size % self.grad_cache_chunk == 0),
            f"grad_cache_chunk must divide batch_size ({self.batch_size}), got {self.grad_cache_chunk}",
        )
        check(self.num_workers >= 1 and self.batch_size >= 1, "num_workers and batch_size must be >= 1")
        check(self.epochs >= 1 and self.checkpoint_every >= 1, "epochs and checkpoint_every must be >= 1")
        check(self.report_interval_s >= 0, "report_interval_s must be >= 0")
        check(self.shuffle_buffer >= 0, "shuffle_buffer must be >= 0")
        check(self.pca_rows >= 2, "pca_rows must be >= 2 (vectors to fit the rotation)")
        check(all(k > 0 for k in self.matryoshka_dims), "matryoshka_dims must be positive")
        check(
            all(len(p) == 2 and min(p) >= 1 for p in self.matryoshka_2d),
            f"matryoshka_2d must be [layers, dim] pairs of positive ints, got {self.matryoshka_2d}",
        )
        check(
            self.matryoshka_weights is None or len(self.matryoshka_weights) == len(self.matryoshka_dims),
            "matryoshka_weights must have one weight per dim",
        )
        # Ray Train workers run in their own folders: local paths must be absolute.
        self.data, self.output_dir = local_abspath(self.data), local_abspath(self.output_dir)
        self.storage_path = local_abspath(self.storage_path or f"{self.output_dir.rstrip('/')}/checkpoints")

    def local_cpus(self) -> float:
        """Logical CPUs a local cluster needs: the workers plus 2 slots for Ray Data's reads (with none
        free the reads never run)."""
        return self.num_workers * self.cpus_per_worker + 2


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
        check(len(self.models) >= 1, "merge needs at least one model")
        if self.eval is not None:
            EvalConfig(**self.eval)  # bad eval settings fail before any merging
        check(
            self.weights is None or len(self.weights) == len(self.models),
            "weights must have one weight per model",
        )
        check(
            self.weights is None or (min(self.weights) >= 0 and sum(self.weights) > 0),
            "weights must be >= 0, not all 0",
        )
