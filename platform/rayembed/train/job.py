"""The train job's driver: checks, the Ray Dataset, `TorchTrainer`, then export and the run report.

The final model is consolidated from the last ZeRO checkpoint on the driver (fp32, any stage) and
written in the sentence-transformers layout to <output_dir>/model; checkpoints live in
<output_dir>/checkpoints/<run_name> unless storage_path says otherwise.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from rayembed.io import ensure_ray, filesystem, read_dataset, require_columns, strip_scheme
from rayembed.model import Embedder, resolve_model_path
from rayembed.model.pca import principal_axes
from rayembed.train.config import TrainConfig
from rayembed.train.export import HISTORY, ROTATION, consolidate, publish, saved_rotation
from rayembed.train.loop import starting_model, train_loop
from rayembed.train.objective import input_columns
from rayembed.train.report import write_report


def fit_rotation(cfg: TrainConfig, ds: Any) -> np.ndarray:
    """pca_rotation: principal axes of what the model learns to match, from the first `pca_rows` rows:
    teacher vectors when distilling (the column, or the in-loop teacher's), else its own embeddings."""
    rows = ds.take_batch(cfg.pca_rows, batch_format="numpy")
    if cfg.loss == "distill" and cfg.teacher_column:
        return principal_axes(np.stack(list(rows[cfg.teacher_column])).astype(np.float32))
    texts = [str(t) for c in input_columns(cfg) for t in rows[c]]
    model = Embedder.load(cfg.teacher) if cfg.loss == "distill" and cfg.teacher else starting_model(cfg)
    return principal_axes(model.encode(texts, batch_size=64))


def checkpoint_rotation(storage_path: str, run_name: str) -> np.ndarray | None:
    """The pca axes kept in the run's newest checkpoint (local or s3://), or None if it has none yet."""
    fs = filesystem(storage_path) or pafs.LocalFileSystem()
    run = f"{strip_scheme(storage_path).rstrip('/')}/{run_name}"
    found = fs.get_file_info(pafs.FileSelector(run, allow_not_found=True))
    folders = sorted(
        i.path for i in found if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
    )
    for folder in reversed(folders):
        if fs.get_file_info(f"{folder}/{ROTATION}").type == pafs.FileType.File:
            with fs.open_input_file(f"{folder}/{ROTATION}") as f:
                return np.load(io.BytesIO(f.read()))
    return None


def run_evals(cfg: TrainConfig, trained: Embedder, rotation: Any) -> dict[str, Any] | None:
    """The run's `eval` section applied to the starting model (rotated as training started) and to the
    trained one."""
    if not cfg.eval:
        return None
    from rayembed.eval.config import EvalConfig
    from rayembed.eval.job import evaluate

    before = starting_model(cfg, str(trained.device), rotation)
    settings = {**cfg.eval, "model": cfg.model, "output": None}
    return {
        "before": evaluate(EvalConfig(**settings), before),
        "after": evaluate(EvalConfig(**settings), trained),
    }


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the job on the current Ray cluster (starting a local one if none); returns a summary."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    resolve_model_path(cfg.model)  # unknown model: fail before starting workers
    if cfg.teacher and not cfg.teacher_column:
        resolve_model_path(cfg.teacher)
    ensure_ray(cfg.local_cpus())
    ds = read_dataset(cfg.data)
    needed = input_columns(cfg)
    require_columns(ds, needed, "train")
    rotation = None
    if cfg.pca_rotation:  # a resumed run keeps the axes it started with; only a new run fits them
        rotation = checkpoint_rotation(str(cfg.storage_path), cfg.run_name)
        rotation = fit_rotation(cfg, ds) if rotation is None else rotation
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "rotation": rotation},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=cfg.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": ds.select_columns(needed)},
    )
    started = time.perf_counter()
    result = trainer.fit()
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as d:
        model = consolidate(d, cfg.model, cfg.student_layers)
        history = json.loads(Path(d, HISTORY).read_text()) if Path(d, HISTORY).is_file() else []
        rotation = saved_rotation(d, rotation)
    model.name = f"{model.name}-{cfg.run_name}"
    root = cfg.output_dir.rstrip("/")
    summary = {
        "output_dir": publish(model.save, f"{root}/model"),
        "checkpoint": result.checkpoint.path,
        **(result.metrics or {}),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    evals = run_evals(cfg, model.to("cuda" if torch.cuda.is_available() else "cpu"), rotation)
    summary["report"] = publish(lambda p: write_report(p, summary, history, evals), f"{root}/report")
    return summary
