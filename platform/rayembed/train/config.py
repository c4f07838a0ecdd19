"""`train` and `merge` job settings: one `@dataclass` each, a docstring per field, checks in `__post_init__`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rayembed.eval.config import EvalConfig
from rayembed.io import local_abspath
from rayembed.model.layout import model_ref
from rayembed.settings import build, check, one_of
from rayembed.tracking import TrackingConfig


@dataclass
class TrainConfig:
    data: str
    """JSONL/Parquet file or folder (local or s3://). Contrastive: query/positive[/negative] columns;
    distill: a text column; data_format=flagembedding: FlagEmbedding's files as they are."""
    output_dir: str
    """Run folder, local or s3://: the final model goes to <output_dir>/model (sentence-transformers layout)."""
    model: str = "default"
    """Model to start from: a local folder or 'default' (bundled all-MiniLM-L6-v2); any HF encoder or
    decoder backbone (BERT, Llama/Mistral, Qwen2/3, Gemma/Gemma 3, ...)."""
    pooling: str | None = None
    """Pooling: mean, cls, lasttoken (the final EOS token's state) or latent_attention (NV-Embed's
    trainable head, then mean); null: the model's own (a plain decoder: last token, an encoder: mean)."""
    attention: str | None = None
    """Decoder backbones: causal, or bidirectional (the causal mask removed, as NV-Embed, LLM2Vec and
    Gemini Embedding do); kept in the exported model, so embed and serve attend the same way. Null: as
    the model was saved (a plain decoder: causal). Encoders attend both ways already."""
    include_prompt: bool | None = None
    """Pool the instruction's tokens too (null: the model's own setting); false leaves them out of mean
    pooling (NV-Embed; sentence-transformers' include_prompt)."""
    num_latents: int = 512
    """latent_attention: size of the latent array the token states attend to (NV-Embed: 512)."""
    latent_heads: int = 8
    """latent_attention: attention heads (the hidden size must divide by it)."""
    lora_r: int = 0
    """LoRA rank; 0 trains every weight (full fine-tuning). With LoRA only the adapters (and a pooling
    head or output layer) train and are checkpointed; the export merges them into a plain model."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA path."""
    lora_target_modules: list[str] | None = None
    """Linear layers (name suffixes, e.g. [q_proj, k_proj, v_proj, o_proj]) that get adapters; null:
    every linear layer of the backbone. Names matching no layer are refused before training starts."""
    dropout: float | None = None
    """Dropout probability of the backbone while training (every dropout layer, and decoders' attention
    dropout); null keeps the model's own (BERT: 0.1). Distillation fits its teacher better
    with 0 (docs/benchmarks.md); the exported model's config is left as it was."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them (less memory for
    about a third more compute; combine with grad_cache_chunk for very large batches)."""
    output_dim: int | None = None
    """Add a trainable bias-free output layer of this width (a sentence-transformers Dense), e.g. the
    teacher's width when the student's hidden size differs (a decoder teacher, an encoder student)."""
    storage_path: str | None = None
    """Checkpoints' Ray Train storage, local or s3:// (several nodes: s3:// or shared_storage); default:
    <output_dir>/checkpoints."""
    shared_storage: bool = False
    """storage_path is a local path that every node mounts (NFS, EFS, Lustre): allowed on several nodes."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint for every s3:// path of the run: data, model, teacher, checkpoints, output
    (else $AWS_ENDPOINT_URL, else AWS). Passed to the workers as AWS_ENDPOINT_URL."""
    run_name: str = "rayembed-train"
    """Run name under storage_path; rerunning with the same name resumes from its latest checkpoint."""
    num_workers: int = 2
    """Ray Train workers (one GPU each when use_gpu); with min_workers, the most it runs."""
    min_workers: int | None = None
    """Elastic training: after a node loss (max_failures > 0) Ray Train restarts from the last checkpoint
    on as few as this many workers, at the first row not yet trained on (train/order.py), the checkpoint
    loaded through DeepSpeed's universal form; the global batch is batch_size x the workers running."""
    use_gpu: bool = False
    """Run on GPUs (nccl); otherwise CPU workers (gloo)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    export_resources: dict[str, Any] = field(default_factory=dict)
    """Ray resources of the export task (ZeRO shards gathered, LoRA merged, int8 calibration, eval, model
    and report published), which runs on a node that has them, not on the driver: num_cpus, num_gpus,
    memory (bytes), resources ({name: amount}). Default: the CPUs the workers held, free once they end
    (num_workers x cpus_per_worker, at most a node's; with use_gpu one worker's and 1 GPU): the export's
    evals and int8 calibration use as many threads."""
    placement_strategy: str = "PACK"
    """How Ray places the workers: PACK (fewest nodes), SPREAD (one per node where it can), or
    STRICT_PACK / STRICT_SPREAD."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 (as DDP), 1 (optimizer states sharded), 2 (+ gradients) or 3 (+ parameters)."""
    zero_bucket_size: int = 50_000_000
    """Elements per ZeRO communication bucket, ZeRO-3 prefetch and live-parameter window, and optimizer
    sub-group. DeepSpeed's own defaults (5e8 to 1e9) hold buffers of several GB per worker: a 0.5B model's
    ZeRO-3 peak per worker fell from 8.8 to 5.6 GB with 5e7 (docs/benchmarks.md); raise it on large GPUs."""
    malloc_mmap_threshold: int | None = 65536
    """glibc's MALLOC_MMAP_THRESHOLD_ for the workers (bytes): freed buffers above it go back to the OS (a
    0.4B decoder's ZeRO-3 peak per worker: 7.0 GB with glibc's growing default, 3.9 GB with 64 KiB,
    docs/benchmarks.md). Null: glibc's default (or what the workers' environment says)."""
    offload: str | None = None
    """ZeRO-Offload, a GPU lever: 'optimizer' keeps optimizer states (and their step) in CPU memory
    (ZeRO 1-3); 'all' also the parameters (ZeRO-3)."""
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
    """Teacher model run inside the training loop (no grad): distill's teacher (with teacher_column: the
    model that embedded the column, not run), GIST's guide, score_distill's scorer."""
    teacher_column: str | None = None
    """Distillation: column of precomputed teacher vectors (e.g. its `rayembed embed` output): none run."""
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
    """Matryoshka from a model not trained for it: before training, add an orthogonal output layer (a Dense)
    at the principal axes of the vectors the model learns to match (the teacher's, else its own embeddings of
    the first `pca_rows` rows), teacher vectors rotated alike: full-width similarities unchanged, each prefix
    starts with the most variance it can hold. Kept in checkpoints."""
    pca_ranking_steps: int = 0
    """With pca_rotation: turn the axes by this many steps of rayembed.model.pca.ranking_axes, so each
    matryoshka_dims prefix ranks neighbours as full width does (1000: ~2 min on 2 cores). 0: principal axes."""
    pca_rows: int = 4096
    """Rows read to fit `pca_rotation`: their teacher_column vectors, else their texts embedded on the driver."""
    pca_source: str | None = None
    """With pca_rotation: fit on the rows read whose prepare `source` is this ('corpus': the documents to embed;
    docs/benchmarks.md); under 1,000 such rows (no corpus given), on all of them. The report's `pca_fit` says."""
    int8_calibration_texts: int = 512
    """Texts (of the first rows) the exported model embeds on the driver after training to calibrate its
    int8 scales at full width and each matryoshka_dims width (rayembed.model.vectors.calibrate_int8; kept
    in the model's int8_scales.json). 0: none, int8 codes stay round(127 x)."""
    matryoshka_2d: list[list[int]] = field(default_factory=list)
    """2D Matryoshka (Starbucks): [layers, dim] pairs, e.g. [[2, 128], [4, 256]]; each trains the model's
    first `layers` layers, pooled, at width `dim`, with the same loss (weight 1), besides the full model.
    Cut such a sub-model out of the exported model with `Embedder.keep_layers(range(layers))`."""
    query_column: str = "query"
    """Contrastive: query text column."""
    positive_column: str = "positive"
    """Contrastive: positive document column."""
    negative_column: str | None = None
    """Contrastive: optional hard-negative column: one text per row, or a list of texts (the same
    number in every row: k negatives per query)."""
    query_instruction: str | None = None
    """Task instruction put before every query (documents get none), e.g. 'Given a web search query,
    retrieve relevant passages that answer the query'; also saved as the exported model's `query`
    prompt, so `rayembed embed prompt_name=query` and serve's `prompt_name` use it."""
    instruction_column: str | None = None
    """Per-row task instruction for the query (empty rows fall back to query_instruction)."""
    instruction_template: str = "Instruct: {task}\nQuery:"
    """How a task becomes the query's prefix (Qwen3-Embedding / E5-Mistral style); '{task}' alone
    puts the instruction as it is."""
    prompts: dict[str, str] = field(default_factory=dict)
    """More named prompts saved with the exported model (sentence-transformers `prompts`)."""
    data_format: str = "columns"
    """columns (the *_column settings name them) or flagembedding: FlagEmbedding's fine-tuning files as
    they are (query, pos list, neg list, prompt, type, pos_scores/neg_scores): per row one positive and
    group_size - 1 sampled negatives, the row's prompt as its instruction, and folders whose name ends
    in no_in_batch_neg trained without in-batch negatives."""
    group_size: int = 8
    """flagembedding: texts per query, 1 positive + group_size - 1 negatives (FlagEmbedding's
    train_group_size); type only_1neg rows use 1 negative, symmetric_class rows at most their own."""
    score_weight: float = 0.0
    """flagembedding: weight of KL(teacher || student) over each query's group, the teacher's
    distribution from the rows' pos_scores/neg_scores (rows without scores add nothing)."""
    score_temperature: float = 1.0
    """Temperature the teacher scores are divided by before their softmax."""
    text_column: str = "text"
    """Distillation: text column."""
    batch_size: int = 32
    """Rows per worker per step; negatives are gathered across workers (global batch = workers x this)."""
    grad_cache_chunk: int | None = None
    """GradCache: embed the batch in chunks of this many rows (must divide batch_size), so activation
    memory follows the chunk while the loss still sees the whole (gathered) batch; gradients are exact."""
    forward_tokens: int | None = None
    """Cut each tower (or GradCache chunk) into length-sorted pieces of at most this many padded tokens
    for its forward passes (model.batching.by_length): the result of one padded pass, without padding
    most of the compute on mixed lengths. Workers run as many pieces as the one that needs most (ZeRO-3
    gathers parameters in every pass). None: one padded pass per tower."""
    max_length: int | None = None
    """Token limit while training (default: the model's max_seq_length), at most its positions; the exported
    model keeps its own."""
    export_pair: bool = True
    """Distillation with a `teacher`: export it too, in the student's frame (`<output_dir>/teacher-in-frame`,
    role document; the student: query), the corpus's encoder for the student's queries (train/pair.py)."""
    export_max_length: int | None = None
    """The exported model's token limit (its max_seq_length), e.g. 8192 for a long-context decoder whose
    folder gives none (read as 512); default: the starting model's. At most the model's positions."""
    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    epochs: int = 1
    """Passes over the data."""
    shuffle_buffer: int = 0
    """Rows permuted together: the data is read in order and each window of this many rows is permuted
    by (seed, epoch, window), the same on every worker (rayembed.train.order); 0 keeps file order. A run
    resumed mid-epoch goes on at the first row not yet trained on, on any number of workers."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total."""
    checkpoint_every: int = 50
    """Report a checkpoint every N steps (and always at the end)."""
    report_interval_s: float = 5.0
    """Seconds between metric reports to Ray Train, at least (checkpoints always; the history has every
    step): Ray Train takes ~1 report per 2 s, so reporting every step held a GPU to 0.5 steps/s. 0: all."""
    keep_checkpoints: int = 2
    """Checkpoints kept by Ray Train."""
    max_failures: int = 0
    """Worker failures Ray Train recovers from (restarting from the latest checkpoint)."""
    collective_timeout_s: float = 600.0
    """Longest wait in a collective: past it a worker fails naming the step, phase and collective (hang.py)
    and Ray Train restarts from the last checkpoint (max_failures). Above the slowest checkpoint upload."""
    stall_warning_s: float = 900.0
    """The driver warns (summary: `stalls`) when no step has finished for this long; 0: no watchdog."""
    seed: int = 0
    """Random seed."""
    eval: dict[str, Any] | None = None
    """Eval settings (EvalConfig fields: beir_dir, sts_file, max_queries, dims, precisions, ...) applied to
    the model before and after training, for the run report; null: the report has the curves only."""
    tracking: dict[str, Any] | None = None
    """Experiment tracking (TrackingConfig fields: backend, uri, experiment, register_as, alias, ...): the
    config as params, rank 0's metrics per step, eval, report and model as artifacts; null: untracked."""

    def __post_init__(self) -> None:
        if self.eval is not None:
            EvalConfig(**{"teacher": self.teacher, **self.eval})  # bad settings fail now, not after training
        if self.tracking is not None:
            build(TrackingConfig, self.tracking)
        self._check_loss()
        self._check_model()
        check(
            self.grad_cache_chunk is None
            or (self.grad_cache_chunk >= 1 and self.batch_size % self.grad_cache_chunk == 0),
            f"grad_cache_chunk must divide batch_size ({self.batch_size}), got {self.grad_cache_chunk}",
        )
        check(self.num_workers >= 1 and self.batch_size >= 1, "num_workers and batch_size must be >= 1")
        f = self.forward_tokens
        check(f is None or f >= 1, f"forward_tokens must be >= 1 (or null: one padded pass), got {f}")
        check(
            self.min_workers is None or 1 <= self.min_workers <= self.num_workers,
            f"min_workers must be between 1 and num_workers ({self.num_workers}), got {self.min_workers}",
        )
        known = {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type"}
        check(set(self.export_resources) <= known, f"export_resources takes {sorted(known)}")
        lengths = (self.max_length, self.export_max_length)
        check(all(n is None or n >= 1 for n in lengths), "max_length and export_max_length must be >= 1")
        check(self.epochs >= 1 and self.checkpoint_every >= 1, "epochs and checkpoint_every must be >= 1")
        check(self.report_interval_s >= 0, "report_interval_s must be >= 0")
        check(self.collective_timeout_s > 0, "collective_timeout_s must be > 0")
        check(self.stall_warning_s >= 0, "stall_warning_s must be >= 0 (0: no watchdog)")
        check(self.shuffle_buffer >= 0, "shuffle_buffer must be >= 0")
        check(self.pca_rows >= 2, "pca_rows must be >= 2 (vectors to fit the rotation)")
        ranking = self.pca_ranking_steps == 0 or (self.pca_rotation and bool(self.matryoshka_dims))
        check(ranking, "pca_ranking_steps needs pca_rotation and matryoshka_dims (prefixes to turn for)")
        check(self.pca_ranking_steps >= 0, "pca_ranking_steps must be >= 0")
        check(self.pca_source is None or self.pca_rotation, "pca_source needs pca_rotation (axes to fit)")
        n = self.int8_calibration_texts
        check(n == 0 or n >= 2, f"int8_calibration_texts must be 0 (off) or >= 2, got {n}")
        check(all(k > 0 for k in self.matryoshka_dims), "matryoshka_dims must be positive")
        check(
            all(len(p) == 2 and min(p) >= 1 for p in self.matryoshka_2d),
            f"matryoshka_2d must be [layers, dim] pairs of positive ints, got {self.matryoshka_2d}",
        )
        w = self.matryoshka_weights
        check(w is None or len(w) == len(self.matryoshka_dims), "matryoshka_weights: one weight per dim")
        check("{task}" in self.instruction_template, "instruction_template must contain {task}")
        # Ray Train workers run in their own folders: local paths must be absolute.
        self.data, self.output_dir = local_abspath(self.data), local_abspath(self.output_dir)
        self.model, self.teacher = model_ref(self.model), self.teacher and model_ref(self.teacher)
        self.storage_path = local_abspath(self.storage_path or f"{self.output_dir.rstrip('/')}/checkpoints")

    def _check_loss(self) -> None:
        from rayembed.train.losses import GUIDED, LOSSES

        one_of("loss", self.loss, sorted(LOSSES))
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
        scale = not self.learnable_scale or self.loss == "symmetric_infonce"
        check(scale, "learnable_scale needs loss=symmetric_infonce")
        one_of("data_format", self.data_format, ("columns", "flagembedding"))
        check(
            self.data_format == "columns" or self.loss == "infonce",
            "data_format=flagembedding trains with loss=infonce (groups, per-row in-batch negatives)",
        )
        check(self.group_size >= 1, "group_size must be >= 1")
        check(
            self.score_weight == 0 or self.data_format == "flagembedding",
            "score_weight needs data_format=flagembedding",
        )

    def _check_model(self) -> None:
        from rayembed.model.backbone import ATTENTIONS
        from rayembed.model.pooling import POOLINGS

        one_of("zero_stage", self.zero_stage, (0, 1, 2, 3))
        one_of("precision", self.precision, ("fp32", "bf16", "fp16"))
        check(self.precision != "fp16" or self.use_gpu, "fp16 needs use_gpu=true; use bf16 or fp32 on CPU")
        one_of("pooling", self.pooling, sorted(POOLINGS), optional=True)
        one_of("attention", self.attention, ATTENTIONS, optional=True)
        check(
            self.lora_r >= 0 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1,
            "lora_r >= 0, lora_alpha > 0, 0 <= lora_dropout < 1",
        )
        check(self.dropout is None or 0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(
            self.lora_target_modules is None or bool(self.lora_target_modules),
            "lora_target_modules: a non-empty list or null",
        )
        one_of("offload", self.offload, ("optimizer", "all"), optional=True)
        check(
            self.offload is None or self.use_gpu,
            "offload (ZeRO-Offload) moves GPU memory to the CPU: it needs use_gpu=true",
        )
        check(
            self.offload != "all" or self.zero_stage == 3, "offload=all (parameters too) needs zero_stage=3"
        )
        check(self.output_dim is None or self.output_dim >= 1, "output_dim must be >= 1")
        check(self.zero_bucket_size >= 1_000_000, "zero_bucket_size must be >= 1e6 elements")
        one_of(
            "placement_strategy", self.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
        )
        check(
            self.malloc_mmap_threshold is None or self.malloc_mmap_threshold >= 4096,
            "malloc_mmap_threshold: >= 4096 bytes or null",
        )
        check(self.num_latents >= 1 and self.latent_heads >= 1, "num_latents and latent_heads must be >= 1")

    def local_cpus(self) -> float:
        """Logical CPUs a local cluster needs: the workers plus 2 slots for Ray Data's reads (with none
        free the reads never run)."""
        return self.num_workers * self.cpus_per_worker + 2


@dataclass
class MergeConfig:
    models: list[str]
    """Models to average: sentence-transformers folders or a run's DeepSpeed checkpoint folders (or s3://)."""
    output: str
    """Folder for the merged model (sentence-transformers layout), local or s3://."""
    weights: list[float] | None = None
    """One weight per model (default: uniform soup)."""
    base: str | None = None
    """Architecture and tokenizer (default: the first model; needed when merging DeepSpeed checkpoints)."""
    name: str | None = None
    """Name of the merged model (default: <base name>-soup<N>)."""
    eval: dict[str, Any] | None = None
    """Eval settings (EvalConfig fields) applied to every ingredient and the soup (merge_report.md/.json)."""
    calibration_texts: str | None = None
    """JSONL or Parquet file or folder of texts, local or s3:// (e.g. the runs' data): the soup's int8 scales are
    calibrated on its first `int8_calibration_texts` texts, at the base model's calibrated widths (full width
    if none). Unset: saved uncalibrated (int8 = round(127 x)); the ingredients' scales fit other weights."""
    text_column: str = "text"
    """Column of `calibration_texts` holding the texts."""
    int8_calibration_texts: int = 512
    """How many texts of `calibration_texts` calibrate the soup's int8 scales (>= 2)."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint for every s3:// path above and in `eval` (default: $AWS_ENDPOINT_URL, else AWS)."""

    def __post_init__(self) -> None:
        check(len(self.models) >= 1, "merge needs at least one model")
        check(self.int8_calibration_texts >= 2, "int8_calibration_texts must be >= 2")
        if self.eval is not None:
            EvalConfig(**self.eval)  # bad eval settings fail before any merging
        w = self.weights
        check(w is None or len(w) == len(self.models), "weights must have one weight per model")
        check(w is None or (min(w) >= 0 and sum(w) > 0), "weights must be >= 0, not all 0")
