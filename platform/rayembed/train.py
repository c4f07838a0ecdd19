"""Train job: Ray Train `TorchTrainer` workers running DeepSpeed ZeRO, checkpoint/resume, export.

Workers get everything through the config dict; nothing is read from module globals.
The final model is consolidated from the last ZeRO checkpoint on the driver (fp32, any stage)
and written in the sentence-transformers layout to <output_dir>/model; checkpoints live in
<output_dir>/checkpoints/<run_name> unless storage_path says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from rayembed.config import TrainConfig
from rayembed.dist import all_have, gather_with_grad
from rayembed.io import is_s3, upload_dir
from rayembed.losses import CONTRASTIVE, LOSSES, matryoshka
from rayembed.model import Embedder

CKPT_TAG = "ds"


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """DeepSpeed config; torch AdamW so CPU runs need no compiled optimizer op."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
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


def build_loss(cfg: TrainConfig) -> torch.nn.Module:
    if cfg.loss in CONTRASTIVE:
        return LOSSES[cfg.loss](scale=cfg.scale)
    return LOSSES[cfg.loss](
        alignment=cfg.distill_alignment, kl_weight=cfg.kl_weight, temperature=cfg.temperature
    )


def compute_loss(
    engine: Any, teacher: Embedder | None, batch: dict[str, Any], cfg: TrainConfig
) -> torch.Tensor:
    """One step's loss; contrastive documents (and hard negatives) are gathered from all workers."""
    model: Embedder = engine.module
    loss_fn = build_loss(cfg)

    def embed(texts: Any) -> torch.Tensor:
        feats = {k: v.to(engine.device) for k, v in model.tokenize([str(t) for t in texts]).items()}
        return engine(**feats)

    if cfg.loss in CONTRASTIVE:
        q = embed(batch[cfg.query_column])
        d, offset = gather_with_grad(embed(batch[cfg.positive_column]))
        neg = gather_with_grad(embed(batch[cfg.negative_column]))[0] if cfg.negative_column else None
        return matryoshka(loss_fn, cfg.matryoshka_dims, cfg.matryoshka_weights, q, d, neg, offset=offset)
    assert teacher is not None
    texts = [str(t) for t in batch[cfg.text_column]]
    with torch.no_grad():
        t = teacher.embed_texts(texts)
    return matryoshka(loss_fn, cfg.matryoshka_dims, cfg.matryoshka_weights, embed(texts), t)


def _save_and_report(engine: Any, state: dict[str, int], metrics: dict[str, float]) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state=dict(state))
        ray.train.report({**metrics, **state}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    cfg = TrainConfig(**config)
    os.environ["DS_ACCELERATOR"] = "cuda" if cfg.use_gpu else "cpu"
    import deepspeed
    import ray.train

    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    model = Embedder.load(cfg.model, device=str(device))
    model.max_length = cfg.max_length or model.max_length
    model.train()
    teacher = (
        Embedder.load(cfg.teacher, device=str(device)) if cfg.loss == "distill" and cfg.teacher else None
    )
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=deepspeed_config(cfg)
    )

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=CKPT_TAG)
        state.update({k: int(client[k]) for k in state})
    resumed_from = state["step"]

    shard = ray.train.get_dataset_shard("train")
    max_steps = cfg.max_steps or 10**12
    loss_value, saved = float("nan"), -1
    while state["epoch"] < cfg.epochs and state["step"] < max_steps:
        batches = shard.iter_batches(batch_size=cfg.batch_size, drop_last=True, batch_format="numpy")
        it = iter(batches)
        for _ in range(state["batch_in_epoch"]):  # resume mid-epoch: skip what was trained on
            next(it, None)
        while state["step"] < max_steps:
            batch = next(it, None)
            if not all_have(batch is not None, device):
                break
            assert batch is not None
            loss = compute_loss(engine, teacher, batch, cfg)
            engine.backward(loss)
            engine.step()
            loss_value = float(loss.detach())
            state["step"] += 1
            state["batch_in_epoch"] += 1
            if state["step"] % cfg.checkpoint_every == 0:
                _save_and_report(engine, state, {"loss": loss_value, "resumed_from": resumed_from})
                saved = state["step"]
            else:
                ray.train.report({"loss": loss_value, "resumed_from": resumed_from, **state})
        else:
            break
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
    if saved != state["step"] or state["step"] == 0:
        _save_and_report(engine, state, {"loss": loss_value, "resumed_from": resumed_from})


def export_checkpoint(
    checkpoint_dir: str | Path, base_model: str, output_dir: str, run_name: str = ""
) -> str:
    """Consolidate a ZeRO checkpoint (any stage) to fp32 and save it in the sentence-transformers layout."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=CKPT_TAG)
    model = Embedder.load(base_model, device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise RuntimeError(
            f"checkpoint does not match {base_model}: missing={missing} unexpected={unexpected}"
        )
    # The base model's max length is kept: `max_length` in training is a speed setting, not the model's limit.
    model.name = f"{model.name}-{run_name}" if run_name else model.name
    if is_s3(str(output_dir)):
        with tempfile.TemporaryDirectory() as tmp:
            upload_dir(model.save(tmp), str(output_dir))
        return str(output_dir)
    out = Path(output_dir)
    if out.exists():
        shutil.rmtree(out)
    return str(model.save(out))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the job on the current Ray cluster (starting a local one if none); returns a summary."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayembed.io import ensure_ray, read_dataset, require_columns
    from rayembed.model import resolve_model_path

    resolve_model_path(cfg.model)  # unknown model: fail before starting workers
    if cfg.teacher:
        resolve_model_path(cfg.teacher)
    ensure_ray(cfg.num_workers * cfg.cpus_per_worker + 2)
    ds = read_dataset(cfg.data)
    needed = (
        [cfg.query_column, cfg.positive_column] + ([cfg.negative_column] if cfg.negative_column else [])
        if cfg.loss in CONTRASTIVE
        else [cfg.text_column]
    )
    require_columns(ds, needed, "train")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=dataclasses.asdict(cfg),
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
    result = trainer.fit()
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as d:
        out = export_checkpoint(d, cfg.model, f"{cfg.output_dir.rstrip('/')}/model", cfg.run_name)
    return {"output_dir": out, "checkpoint": result.checkpoint.path, **(result.metrics or {})}
