"""The train job's driver: checks, the Ray Dataset, `TorchTrainer`, then export and the run report.

The final model is consolidated from the last ZeRO checkpoint by the export task (export.py: a Ray task
placed by `export_resources`, not on the driver; fp32, any stage) and written in the sentence-transformers
layout to <output_dir>/model; checkpoints live in
<output_dir>/checkpoints/<run_name> unless storage_path says otherwise.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from rayembed.data.flagembedding import normalize
from rayembed.io import ensure_ray, filesystem, is_s3, read_dataset, strip_scheme
from rayembed.model import Embedder, resolve_model_path
from rayembed.model import backbone as families
from rayembed.model.layout import read_layout
from rayembed.model.lora import check_targets
from rayembed.model.pca import ranking_axes
from rayembed.model.tokenizer import prepare_tokenizer
from rayembed.tracking import registry_env
from rayembed.train import tracked
from rayembed.train.config import TrainConfig
from rayembed.train.export import ROTATION, export_run, warn_if_no_node_fits_export
from rayembed.train.hang import Board, Watchdog
from rayembed.train.loop import train_loop
from rayembed.train.objective import input_columns
from rayembed.train.order import ingest_config
from rayembed.train.pair import teacher_path, wants_pair
from rayembed.train.start import starting_model

PCA_SOURCE_MIN_ROWS = 1000  # pca_source's rows fit the axes only if there are this many among those read


def rotation_rows(cfg: TrainConfig, rows: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rows `pca_rotation` is fitted on, and what they were (the report's `pca_fit`): the first
    `pca_rows`, of them those whose `source` is `pca_source` when it is set and there are enough."""
    rows = {k: v[: cfg.pca_rows] for k, v in rows.items()}
    read = len(next(iter(rows.values())))
    if cfg.pca_source is None:
        return rows, {"rows": read}
    if "source" not in rows:
        raise ValueError(
            f"train: pca_source={cfg.pca_source!r} picks rows by their 'source' column (prepare writes it; "
            f"the embed job passes it on with passthrough_columns: [text, source]); the rows have {list(rows)}"
        )
    keep = np.asarray(rows["source"]) == cfg.pca_source
    if keep.sum() < PCA_SOURCE_MIN_ROWS:
        print(
            f"train: {keep.sum()} of the {read} rows read have source {cfg.pca_source!r} (< "
            f"{PCA_SOURCE_MIN_ROWS}): pca_rotation is fitted on all {read}",
            flush=True,
        )
        return rows, {"rows": read, "source": None, "source_rows": int(keep.sum())}
    picked = {k: np.asarray(v)[keep] for k, v in rows.items()}
    return picked, {"rows": int(keep.sum()), "of": read, "source": cfg.pca_source}


def fit_rotation(cfg: TrainConfig, rows: dict[str, Any]) -> np.ndarray:
    """pca_rotation: principal axes of what the model learns to match, from `rows` (those rotation_rows
    picked): teacher vectors when distilling (the column, or the in-loop teacher's), else its own
    embeddings; turned for ranking at the matryoshka widths below full if `pca_ranking_steps`."""
    if cfg.loss == "distill" and cfg.teacher_column:
        vectors = np.stack(list(rows[cfg.teacher_column])).astype(np.float32)
    else:
        teacher = cfg.loss == "distill" and cfg.teacher
        model = (
            Embedder.load(resolve_model_path(teacher, cfg.s3_endpoint_url))
            if teacher
            else starting_model(cfg)
        )
        vectors = model.encode(row_texts(cfg, rows), batch_size=64)
    prefixes = [d for d in cfg.matryoshka_dims if d < vectors.shape[1]]
    return ranking_axes(vectors, prefixes, steps=cfg.pca_ranking_steps)  # 0 steps: the principal axes


def first_rows(cfg: TrainConfig, ds: Any, resumed: bool) -> dict[str, Any]:
    """One read of the first rows, for all the driver needs of them: the columns (a missing one fails
    before any worker starts), the teacher column's width, `pca_rows` to fit a new run's pca_rotation
    and the rows of `int8_calibration_texts` texts to calibrate the exported model."""
    n = max(1, cfg.pca_rows if cfg.pca_rotation and not resumed else 0, cfg.int8_calibration_texts)
    try:
        rows = ds.take_batch(n, batch_format="numpy")
    except ValueError as e:  # Ray Data: "The dataset is empty."
        raise ValueError(f"train: no training rows in {cfg.data} ({e})") from None
    missing = [c for c in input_columns(cfg) if c not in rows]
    if missing:
        raise ValueError(f"train: input lacks column(s) {missing}; it has {list(rows)}")
    return rows


def calibration_texts(cfg: TrainConfig, rows: dict[str, Any]) -> list[str]:
    """The first `int8_calibration_texts` texts of `rows`, which calibrate the exported model's int8 scales."""
    return row_texts(cfg, rows)[: cfg.int8_calibration_texts]


def row_texts(cfg: TrainConfig, rows: dict[str, Any]) -> list[str]:
    """The texts of a batch of training rows, row by row (FlagEmbedding rows: their queries)."""
    columns = ["query"] if cfg.data_format == "flagembedding" else input_columns(cfg)
    return [str(rows[c][i]) for i in range(len(rows[columns[0]])) for c in columns]


def run_checkpoints(
    storage_path: str, run_name: str, endpoint_url: str | None = None
) -> tuple[pafs.FileSystem, list[str]]:
    """(the storage's filesystem, the run's checkpoint folders oldest first) under storage_path/run_name."""
    fs = filesystem(storage_path, endpoint_url) or pafs.LocalFileSystem()
    run = f"{strip_scheme(storage_path).rstrip('/')}/{run_name}"
    found = fs.get_file_info(pafs.FileSelector(run, allow_not_found=True))
    return fs, sorted(
        i.path for i in found if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
    )


def checkpoint_rotation(
    storage_path: str, run_name: str, endpoint_url: str | None = None
) -> np.ndarray | None:
    """The pca axes kept in the run's newest checkpoint (local or s3://), or None if it has none yet."""
    fs, folders = run_checkpoints(storage_path, run_name, endpoint_url)
    for folder in reversed(folders):
        if fs.get_file_info(f"{folder}/{ROTATION}").type == pafs.FileType.File:
            with fs.open_input_file(f"{folder}/{ROTATION}") as f:
                return np.load(io.BytesIO(f.read()))
    return None


def check_model(cfg: TrainConfig) -> int:
    """Fail before any worker starts if the model settings cannot work (bidirectional on an encoder,
    LoRA targets that do not exist, last-token pooling without EOS, layers out of range, a token limit
    past the model's positions); the backbone
    is built on the meta device, so this costs no memory at any size. Returns the trained model's width."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = resolve_model_path(cfg.model, cfg.s3_endpoint_url)
    with torch.device("meta"):
        backbone = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    if cfg.attention:
        families.set_attention(backbone, cfg.attention)
    if cfg.student_layers:
        families.keep_layers(backbone, cfg.student_layers)
    if cfg.lora_r:
        check_targets(backbone, cfg.lora_target_modules)
    layout = read_layout(path)
    pooling = cfg.pooling or layout.pooling or ("lasttoken" if families.is_decoder(backbone) else "mean")
    prepare_tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True), pooling)
    positions = getattr(backbone.config, "max_position_embeddings", None)
    for name in ("max_length", "export_max_length"):
        if positions and (getattr(cfg, name) or 0) > positions:
            raise ValueError(f"{name}={getattr(cfg, name)} is more than the model's {positions} positions")
    hidden = int(backbone.config.hidden_size)
    if pooling == "latent_attention" and hidden % cfg.latent_heads:
        raise ValueError(f"latent_heads={cfg.latent_heads} does not divide the hidden size {hidden}")
    return cfg.output_dim or saved_width(path)


def saved_width(path: Any) -> int:
    """Width of a saved model's vectors: its Dense layer's output, else the backbone's hidden size."""
    from transformers import AutoConfig

    layout = read_layout(path)
    if layout.projection is not None:
        return int(layout.projection.shape[0])
    return int(AutoConfig.from_pretrained(path, local_files_only=True).hidden_size)


def teacher_dim(cfg: TrainConfig, rows: dict[str, Any]) -> int | None:
    """Width of the vectors a distilled model must match (the teacher column's or the teacher's)."""
    if cfg.loss != "distill":
        return None
    if cfg.teacher_column:
        width = len(rows[cfg.teacher_column][0])
        if wants_pair(cfg) and (named := saved_width(teacher_path(cfg))) != width:
            raise ValueError(f"{cfg.teacher_column} holds {width}-d vectors, the teacher {cfg.teacher} gives {named}-d: "
                             "name the teacher that embedded the column, or export_pair=false")  # fmt: skip
        return width
    return saved_width(resolve_model_path(str(cfg.teacher), cfg.s3_endpoint_url))


def dataset(cfg: TrainConfig) -> Any:
    """The training rows as a Ray Dataset (FlagEmbedding files: normalized per file, with each row's
    source path)."""
    ds = read_dataset(cfg.data, cfg.s3_endpoint_url, include_paths=cfg.data_format == "flagembedding")
    if cfg.data_format == "flagembedding":
        ds = ds.map_batches(normalize, batch_format="pyarrow", batch_size=None)
    # The run reports its own steps: Ray Data's progress bars of each worker's ingest only filled the job's
    # log (141 KB of them for a 2-step run, 9 KB without). This dataset's own context: others keep theirs.
    ds.context.enable_progress_bars = False
    return ds


def check_storage(cfg: TrainConfig) -> None:
    """Checkpoints must be where every node sees them: on a cluster of several nodes a local
    storage_path is refused unless it is marked shared (each worker would write its rank's files to
    its own node's disk, and neither resume nor export would find them)."""
    import ray

    storage = str(cfg.storage_path)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if is_s3(storage) or cfg.shared_storage or len(nodes) <= 1:
        return
    raise ValueError(
        f"storage_path {storage!r} is a local folder and this Ray cluster has {len(nodes)} nodes: "
        "checkpoints written on one node are not seen on the others. Use s3://... (with "
        "s3_endpoint_url for S3-compatible stores), or a filesystem mounted at that path on every "
        "node and shared_storage=true"
    )


RUN_IDENTITY = ("student_layers", "lora_r", "lora_target_modules", "pooling", "attention", "output_dim",
                "num_latents", "zero_stage")  # fmt: skip


def check_run(cfg: TrainConfig) -> tuple[pafs.FileSystem, str, dict[str, Any]]:
    """A run name resumes its checkpoints, so what shapes them must not change between its starts: a
    start records the model (a fingerprint of its files) and the settings that shape the weights in
    `<storage_path>/<run_name>.rayembed.json`; a start that would resume checkpoints made with others is
    refused by name (DeepSpeed would fail with a shape error, or load the old run's weights onto another
    model). Returns where the record is and what it holds (read on a resume, written on a new start)."""
    from rayembed.model.layout import model_fingerprint

    fs, checkpoints = run_checkpoints(str(cfg.storage_path), cfg.run_name, cfg.s3_endpoint_url)
    path = f"{strip_scheme(str(cfg.storage_path)).rstrip('/')}/{cfg.run_name}.rayembed.json"
    fields = dataclasses.asdict(cfg)
    now = {k: fields[k] for k in RUN_IDENTITY} | {
        "model_fingerprint": model_fingerprint(resolve_model_path(cfg.model, cfg.s3_endpoint_url))
    }
    if checkpoints and fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            before = json.loads(f.read())
        differ = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        if differ:
            raise ValueError(
                f"run {cfg.run_name!r} in {cfg.storage_path} started with other settings {differ} (then, now): "
                "its checkpoints would not fit; use another run_name (or storage_path) for this model"
            )
        return fs, path, before
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(now, indent=1).encode())
    return fs, path, now


def kept_fit(
    run: tuple[pafs.FileSystem, str, dict[str, Any]], fit: dict[str, Any] | None
) -> dict[str, Any] | None:
    """A new run's `pca_fit` joins its run record (`check_run`'s); a resumed run, which keeps its axes,
    reads it back from there, so each export says what the axes were fitted on (None: a run recorded
    before there was one)."""
    fs, path, record = run
    if fit is None:
        return record.get("pca_fit")
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(record | {"pca_fit": fit}, indent=1).encode())
    return fit


def worker_env(cfg: TrainConfig) -> dict[str, str]:
    """Environment of the training workers (set before they start)."""
    import os

    # a models:/ model or teacher is fetched by the workers too
    registry = registry_env(cfg.model, cfg.teacher)
    if cfg.malloc_mmap_threshold is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return registry
    return {"MALLOC_MMAP_THRESHOLD_": str(cfg.malloc_mmap_threshold), **registry}


def torch_trainer(
    cfg: TrainConfig, ds: Any, rotation: Any, board: Any = None, run_id: str | None = None
) -> Any:
    """The Ray Train trainer of the run: workers get the whole config as a dict (no module globals), the
    run's hang.Board to post their step and phase to, and the tracked run's id."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": dataclasses.asdict(cfg),
            "rotation": rotation,
            "board": board,
            "tracking_run_id": run_id,
        },
        scaling_config=ray.train.ScalingConfig(
            # elastic: Train v2 takes (min, max)
            num_workers=(cfg.min_workers, cfg.num_workers) if cfg.min_workers else cfg.num_workers,  # type: ignore[arg-type]
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement_strategy,
        ),
        torch_config=TorchConfig(
            backend="nccl" if cfg.use_gpu else "gloo", timeout_s=int(cfg.collective_timeout_s)
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=strip_scheme(str(cfg.storage_path)),
            storage_filesystem=filesystem(str(cfg.storage_path), cfg.s3_endpoint_url),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg)},  # type: ignore[call-arg]  # Train v2's field
        ),
        datasets={"train": ds},
        dataset_config=ingest_config(),  # every worker reads all rows in one order (order.py)
    )


def fit(cfg: TrainConfig, ds: Any, rotation: Any, run_id: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Ray Train's run, watched (hang.py): (its result, the stalls the driver saw and the failures the
    workers explained)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on the driver's node: a worker node lost mid-run (elastic training) must not take the board with it
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board: Any = ray.remote(Board).options(num_cpus=0, scheduling_strategy=here).remote()
    watchdog = Watchdog(board, cfg.stall_warning_s) if cfg.stall_warning_s else None
    try:
        result = torch_trainer(cfg, ds, rotation, board, run_id).fit()
    finally:
        stalls = watchdog.stop() if watchdog else []
        failures = ray.get(board.snapshot.remote())["failures"]
        ray.kill(board)
    return result, {"stalls": stalls, "worker_failures": failures}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the job on the current Ray cluster (starting a local one if none); returns a summary."""
    width = check_model(cfg)  # bad model settings: fail before starting workers
    if cfg.teacher and (not cfg.teacher_column or wants_pair(cfg)):
        resolve_model_path(cfg.teacher, cfg.s3_endpoint_url)
    ensure_ray(cfg.local_cpus())
    check_storage(cfg)
    warn_if_no_node_fits_export(cfg)
    run = check_run(cfg)
    ds = dataset(cfg)
    rotation = None
    if cfg.pca_rotation:  # a resumed run keeps the axes it started with; only a new run fits them
        rotation = checkpoint_rotation(str(cfg.storage_path), cfg.run_name, cfg.s3_endpoint_url)
    rows = first_rows(cfg, ds, resumed=rotation is not None)
    if (target := teacher_dim(cfg, rows)) not in (None, width):
        raise ValueError(
            f"the teacher's vectors are {target}-d, the student's {width}-d: set output_dim={target}"
        )
    pca_fit = None
    if cfg.pca_rotation and rotation is None:
        fit_rows, pca_fit = rotation_rows(cfg, rows)
        rotation = fit_rotation(cfg, fit_rows)
    if cfg.pca_rotation:
        pca_fit = kept_fit(run, pca_fit)  # a resumed run's: what its first start fitted the axes on
    cfg = tracked.resolved(cfg)  # workers and the export reach the same store, wherever they run
    started, tracker = time.perf_counter(), tracked.start(cfg)
    try:
        run_id = tracker.run_id if tracker else None
        result, watched = fit(cfg, ds.select_columns(input_columns(cfg)), rotation, run_id)
    except BaseException:
        if tracker is not None:
            tracker.close("FAILED")  # a later start of this run_name sets it running again
        raise
    assert result.checkpoint is not None
    summary = {
        "checkpoint": ("s3://" if is_s3(str(cfg.storage_path)) else "") + result.checkpoint.path,
        **(result.metrics or {}),
        "wall_s": round(time.perf_counter() - started, 1),
        **watched,
        **({"pca_fit": pca_fit} if pca_fit else {}),
        **({"tracking": tracker.close(None)} if tracker else {}),
    }
    return export_run(cfg, result.checkpoint, rotation, calibration_texts(cfg, rows), summary)
