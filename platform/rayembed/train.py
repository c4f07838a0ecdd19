"""Train job: Ray Train `TorchTrainer` workers running DeepSpeed ZeRO, checkpoint/resume, export.

Workers get everything through the config dict; nothing is read from module globals.
The final model is consolidated from the last ZeRO checkpoint on the driver (fp32, any stage)
and written in the sentence-transformers layout to <output_dir>/model; checkpoints live in
<output_dir>/checkpoints/<run_name> unless storage_path says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rayembed.config import TrainConfig
from rayembed.dist import agree
from rayembed.gradcache import LossOf, grad_cache_step
from rayembed.io import is_s3, upload_dir
from rayembed.losses import GUIDED
from rayembed.model import Embedder
from rayembed.objective import LossState, build_loss, input_columns, objective, sub_model_layers
from rayembed.pca import principal_axes
from rayembed.report import write_report

CKPT_TAG = "ds"
HISTORY = "history.json"  # rank 0's per-step metrics, kept with each checkpoint
ROTATION = "pca_rotation.npy"  # the axes a pca_rotation run started with, kept with each checkpoint


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """DeepSpeed config; torch AdamW so CPU runs need no compiled optimizer op."""
    config: dict[str, Any] = {
        # GradCache: one micro-batch per chunk, the boundary set by hand on the last one.
        "train_micro_batch_size_per_gpu": cfg.grad_cache_chunk or cfg.batch_size,
        "gradient_accumulation_steps": cfg.batch_size // (cfg.grad_cache_chunk or cfg.batch_size),
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "torch_adam": True},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.warmup_steps:
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr, "warmup_num_steps": cfg.warmup_steps},
        }
    if cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        config["fp16"] = {"enabled": True}
    return config


def backward_step(engine: Any, cfg: TrainConfig, towers: list[list[str]], loss_of: LossOf) -> Tensor:
    """Forward + backward of one batch (plain, or GradCache in chunks); the caller calls engine.step()."""
    model: Embedder = engine.module
    layers = sub_model_layers(cfg)  # 2D Matryoshka: also pool these sub-models' outputs

    def embed(texts: Sequence[str]) -> Tensor:
        feats = {k: v.to(engine.device) for k, v in model.tokenize(list(texts)).items()}
        return engine(**feats, layers=layers) if layers else engine(**feats)

    if not cfg.grad_cache_chunk:
        loss = loss_of([embed(t) for t in towers])
        engine.backward(loss)
        return loss.detach()

    def backward(surrogate: Tensor, last: bool) -> None:
        engine.set_gradient_accumulation_boundary(last)  # reduce gradients once, after the last chunk
        engine.backward(surrogate, scale_wrt_gas=False)

    return grad_cache_step(embed, towers, loss_of, cfg.grad_cache_chunk, backward, engine.device)


def peak_memory_mb(device: torch.device) -> float:
    """This worker's peak memory so far: CUDA allocations on GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _save_and_report(
    engine: Any,
    state: dict[str, int],
    metrics: dict[str, float],
    history: list[Any],
    loss: LossState,
    rotation: Tensor | None,
) -> None:
    """Every worker saves its ZeRO shard (and the loss's own state); rank 0 adds the metric history
    (history.json) for the report and the pca rotation the run started with (pca_rotation.npy)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={**state, **loss.state_dict()})
        if ray.train.get_context().get_world_rank() == 0:
            Path(tmp, HISTORY).write_text(json.dumps(history))
            if rotation is not None:
                np.save(Path(tmp, ROTATION), rotation.cpu().numpy())
        ray.train.report({**metrics, **state}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def starting_model(cfg: TrainConfig, device: str = "cpu", rotation: Any = None) -> Embedder:
    """The model as training starts: `model`, cut to `student_layers`, rotated by `rotation` if given."""
    model = Embedder.load(cfg.model, device=device)
    if cfg.student_layers:
        model.keep_layers(cfg.student_layers)
    return model.rotate(rotation) if rotation is not None else model


def fit_rotation(cfg: TrainConfig, ds: Any) -> np.ndarray:
    """pca_rotation: principal axes of what the model learns to match, from the first `pca_rows` rows:
    teacher vectors when distilling (the column, or the in-loop teacher's), else its own embeddings."""
    rows = ds.take_batch(cfg.pca_rows, batch_format="numpy")
    if cfg.loss == "distill" and cfg.teacher_column:
        return principal_axes(np.stack(list(rows[cfg.teacher_column])).astype(np.float32))
    texts = [str(t) for c in input_columns(cfg) for t in rows[c]]
    model = Embedder.load(cfg.teacher) if cfg.loss == "distill" and cfg.teacher else starting_model(cfg)
    return principal_axes(model.encode(texts, batch_size=64))


def _build(cfg: TrainConfig, device: torch.device, rotation: Tensor | None) -> tuple[Any, Embedder | None]:
    """The DeepSpeed engine around the (optionally layer-pruned, rotated) model, and the in-loop teacher."""
    import deepspeed

    model = starting_model(cfg, str(device), rotation)
    model.max_length = cfg.max_length or model.max_length
    model.train()
    teacher = (
        Embedder.load(cfg.teacher, device=str(device))
        if cfg.teacher and (cfg.loss in GUIDED or (cfg.loss == "distill" and not cfg.teacher_column))
        else None
    )
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=deepspeed_config(cfg)
    )
    return engine, teacher


def _resume(
    engine: Any, loss: LossState, rotation: Tensor | None
) -> tuple[dict[str, int], list[Any], Tensor | None]:
    """Position (step, epoch, batch in epoch), loss state, metric history and the pca rotation the run
    started with, from the latest checkpoint."""
    import ray.train

    state, history = {"step": 0, "epoch": 0, "batch_in_epoch": 0}, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=CKPT_TAG)
            if Path(d, HISTORY).is_file():
                history = json.loads(Path(d, HISTORY).read_text())
        state.update({k: int(client[k]) for k in state})
        loss.load_state_dict(client)
        rotation = saved_rotation(d, rotation)
    return state, [h for h in history if h["step"] <= state["step"]], rotation


def saved_rotation(checkpoint_dir: str | Path, default: Any = None) -> Any:
    """The pca rotation kept in a checkpoint folder (as a tensor), else `default`."""
    path = Path(checkpoint_dir, ROTATION)
    return torch.from_numpy(np.load(path)) if path.is_file() else default


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: config = {"cfg": TrainConfig fields, "rotation": pca axes or None}."""
    cfg = TrainConfig(**config["cfg"])
    os.environ["DS_ACCELERATOR"] = "cuda" if cfg.use_gpu else "cpu"
    import deepspeed
    import ray.train

    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    rotation = None if config["rotation"] is None else torch.as_tensor(config["rotation"])
    engine, teacher = _build(cfg, device, rotation)
    loss_state = LossState(build_loss(cfg).to(device), cfg.scale_lr)
    state, history, rotation = _resume(engine, loss_state, rotation)
    resumed_from, started = state["step"], time.perf_counter()
    shard = ray.train.get_dataset_shard("train")
    max_steps = cfg.max_steps or 10**12
    metrics: dict[str, float] = {"loss": float("nan")}
    saved, last_report = -1, 0.0
    while state["epoch"] < cfg.epochs and state["step"] < max_steps:
        shuffle = {
            "local_shuffle_buffer_size": cfg.shuffle_buffer,
            "local_shuffle_seed": cfg.seed + state["epoch"],
        }
        it = iter(
            shard.iter_batches(
                batch_size=cfg.batch_size,
                drop_last=True,
                batch_format="numpy",
                **(shuffle if cfg.shuffle_buffer else {}),
            )
        )
        for _ in range(state["batch_in_epoch"]):  # resume mid-epoch: skip what was trained on
            next(it, None)
        while state["step"] < max_steps:
            batch = next(it, None)
            due = time.perf_counter() - last_report >= cfg.report_interval_s
            ready, report = agree(batch is not None, due, device)  # same answers on every worker
            if not ready:
                break
            assert batch is not None
            towers, loss_of = objective(cfg, batch, teacher, device, loss_state.loss_fn, rotation)
            loss = float(backward_step(engine, cfg, towers, loss_of))
            engine.step()
            loss_state.step()
            state["step"] += 1
            state["batch_in_epoch"] += 1
            extra = loss_state.metrics()  # e.g. a learnable scale
            metrics = {
                "loss": loss,
                "resumed_from": resumed_from,
                "peak_mem_mb": peak_memory_mb(device),
            } | extra
            history.append(
                {"step": state["step"], "loss": loss, "time_s": time.perf_counter() - started} | extra
            )
            if state["step"] % cfg.checkpoint_every == 0:
                _save_and_report(engine, state, metrics, history, loss_state, rotation)
                saved, last_report = state["step"], time.perf_counter()
            elif report:
                ray.train.report({**metrics, **state})
                last_report = time.perf_counter()
        else:
            break
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
    if saved != state["step"] or state["step"] == 0:
        metrics |= {"resumed_from": resumed_from, "peak_mem_mb": peak_memory_mb(device)}
        _save_and_report(engine, state, metrics, history, loss_state, rotation)


def consolidate(checkpoint_dir: str | Path, base_model: str, layers: list[int] | None = None) -> Embedder:
    """The fp32 model of a ZeRO checkpoint (any stage) on CPU; `layers`: the run's student_layers."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=CKPT_TAG)
    model = Embedder.load(base_model, device="cpu")
    if layers:
        model.keep_layers(layers)
    model.load_weights(state, f"the checkpoint's weights (base {base_model})")  # adds a pca projection
    # The base model's max length is kept: `max_length` in training is a speed setting, not the model's limit.
    return model


def publish(write: Callable[[Path], Any], output_dir: str) -> str:
    """Write a folder with `write(path)` at a local path or s3:// URI, replacing what was there."""
    if is_s3(output_dir):
        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp))
            upload_dir(tmp, output_dir)
        return output_dir
    out = Path(output_dir)
    if out.exists():
        shutil.rmtree(out)
    write(out)
    return str(out)


def run_evals(cfg: TrainConfig, trained: Embedder, rotation: Any) -> dict[str, Any] | None:
    """The run's `eval` section applied to the starting model (rotated as training started) and to the
    trained one."""
    if not cfg.eval:
        return None
    from rayembed.config import EvalConfig
    from rayembed.evaluate import evaluate

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

    from rayembed.io import cpus_needed, ensure_ray, read_dataset, require_columns
    from rayembed.model import resolve_model_path

    resolve_model_path(cfg.model)  # unknown model: fail before starting workers
    if cfg.teacher and not cfg.teacher_column:
        resolve_model_path(cfg.teacher)
    ensure_ray(cpus_needed(cfg))
    ds = read_dataset(cfg.data)
    needed = input_columns(cfg)
    require_columns(ds, needed, "train")
    rotation = fit_rotation(cfg, ds) if cfg.pca_rotation else None
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
        rotation = saved_rotation(d, rotation)  # a resumed run's own axes, not the ones fitted just now
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
