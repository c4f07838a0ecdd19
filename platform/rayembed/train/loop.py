"""The training loop every Ray Train worker runs: DeepSpeed ZeRO engine, steps, checkpoints, resume.

Workers get everything through the config dict (`train_loop(config)`); nothing is read from module
globals. Each step turns a batch into text towers and a loss of their embeddings (objective.py), runs
forward + backward plainly or in GradCache chunks, and steps the engine; every `checkpoint_every` steps
each worker saves its ZeRO shard into one Ray Train checkpoint.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rayembed.model import Embedder, resolve_model_path
from rayembed.model.batching import Text, by_length
from rayembed.model.lora import has_lora
from rayembed.train import tracked
from rayembed.train.config import TrainConfig
from rayembed.train.dist import agree, import_deepspeed, init_deepspeed, most
from rayembed.train.export import CKPT_TAG, HISTORY, ROTATION, saved_rotation, saved_world_size, to_universal
from rayembed.train.gradcache import LossOf, grad_cache_step
from rayembed.train.hang import Watch, bound_collectives
from rayembed.train.losses import GUIDED
from rayembed.train.objective import LossState, build_loss, objective, sub_model_layers
from rayembed.train.order import epoch_order, global_batches, num_rows, worker_slice
from rayembed.train.persist import checkpoint_name, discard, upload
from rayembed.train.start import starting_model, trainable_model


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """DeepSpeed config; torch AdamW so CPU runs need no compiled optimizer op."""
    config: dict[str, Any] = {
        # GradCache: one micro-batch per chunk, the boundary set by hand on the last one.
        "train_micro_batch_size_per_gpu": cfg.grad_cache_chunk or cfg.batch_size,
        "gradient_accumulation_steps": cfg.batch_size // (cfg.grad_cache_chunk or cfg.batch_size),
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": cfg.zero_stage} | zero_buffers(cfg) | offload_config(cfg),
        "optimizer": {
            "type": "AdamW",
            # torch's fused kernel: the unfused one made whole-partition temporaries (1.4 GB on a 0.4B
            # model's ZeRO-2 step on CPU); torch_adam: no compiled DeepSpeed op needed on CPU
            "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "torch_adam": True, "fused": True},
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


def zero_buffers(cfg: TrainConfig) -> dict[str, Any]:
    """Bounded ZeRO working sets (`zero_bucket_size`): communication buckets, and for ZeRO-3 the
    prefetch / live-parameter window and the optimizer's sub-groups, whose temporaries otherwise span
    the whole partition."""
    n = cfg.zero_bucket_size
    if cfg.zero_stage in (1, 2):
        return {"reduce_bucket_size": n, "allgather_bucket_size": n}
    if cfg.zero_stage == 3:
        keys = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
                "stage3_max_reuse_distance", "sub_group_size")  # fmt: skip
        return dict.fromkeys(keys, n)
    return {}


def offload_config(cfg: TrainConfig) -> dict[str, Any]:
    """ZeRO-Offload: optimizer states (and 'all': parameters) in pinned CPU memory."""
    if not cfg.offload:
        return {}
    out = {"offload_optimizer": {"device": "cpu", "pin_memory": True}}
    return out | ({"offload_param": {"device": "cpu", "pin_memory": True}} if cfg.offload == "all" else {})


def backward_step(
    engine: Any,
    cfg: TrainConfig,
    towers: list[Sequence[Text]],
    loss_of: LossOf,
    seen: Counter[str] | None = None,
) -> Tensor:
    """Forward + backward of one batch (plain, or GradCache in chunks); the caller calls engine.step().
    `seen["tokens"]` counts the tokens (padding left out) of the passes with autograd: each text once."""
    model: Embedder = engine.module
    layers = sub_model_layers(cfg)  # 2D Matryoshka: also pool these sub-models' outputs

    def embed(texts: Sequence[Text]) -> Tensor:
        tokens = model.tokenize(list(texts))
        if seen is not None and torch.is_grad_enabled():  # GradCache's first pass runs without
            seen["tokens"] += int(tokens["attention_mask"].sum())  # on the CPU: no device sync
        feats = {k: v.to(engine.device) for k, v in tokens.items()}
        # every worker runs as many passes as the one whose lengths need most: ZeRO-3 gathers each
        # layer's parameters from all workers in every pass, so a worker with fewer would wait forever
        return by_length(
            lambda f: engine(**f, layers=layers) if layers else engine(**f),
            feats,
            cfg.forward_tokens,
            pieces=lambda n: most(n, engine.device),
        )

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
) -> bool:
    """Every worker saves its ZeRO shard (and the loss's own state) — with LoRA only what trains; rank 0
    adds the metric history (history.json) for the report and the pca rotation the run started with
    (pca_rotation.npy). Each uploads its files (retried, persist.py); the checkpoint is reported only if
    every worker's arrived, else the metrics alone are: returns whether it was."""
    import ray.train

    name, rank = checkpoint_name(state["step"]), ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as tmp:
        client = {**state, **loss.state_dict()}
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state=client, exclude_frozen_parameters=True)
        if rank == 0:
            Path(tmp, HISTORY).write_text(json.dumps(history))
            if rotation is not None:
                np.save(Path(tmp, ROTATION), rotation.cpu().numpy())
        persisted = upload(tmp, name)
    complete, _ = agree(persisted is not None, device=engine.device)
    if not complete:
        if rank == 0:
            discard(name)
        ray.train.report({**metrics, **state})
        return False
    ray.train.report({**metrics, **state}, checkpoint=persisted, checkpoint_dir_name=name,
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)  # fmt: skip
    return True


def _checkpoint_or_report(
    cfg: TrainConfig,
    engine: Any,
    state: dict[str, int],
    metrics: dict[str, float],
    kept: tuple[Any, ...],
    fixed: dict[str, Any],
    watch: Watch,
) -> int | None:
    """A checkpoint when one is due (its step; one the store refused is counted in `fixed`, and training
    goes on with the next due as planned), else the metrics alone."""
    import ray.train

    if state["step"] % cfg.checkpoint_every:
        watch.at(state["step"], "report")
        ray.train.report({**metrics, **state})
        return None
    watch.at(state["step"], "checkpoint")
    if _save_and_report(engine, state, metrics, *kept):
        return state["step"]
    fixed["checkpoint_failures"] += 1
    return None


def _build(cfg: TrainConfig, device: torch.device, rotation: Tensor | None) -> tuple[Any, Embedder | None]:
    """The DeepSpeed engine around the starting model (start.py) with what trains, and the in-loop teacher."""
    deepspeed = import_deepspeed()

    ds_config = deepspeed_config(cfg)
    model = trainable_model(cfg, starting_model(cfg, str(device), rotation, ds_config), recompute=True)
    model.max_length = cfg.max_length or model.max_length
    model.train()
    teacher = (
        Embedder.load(resolve_model_path(cfg.teacher, cfg.s3_endpoint_url), device=str(device))
        if cfg.teacher and (cfg.loss in GUIDED or (cfg.loss == "distill" and not cfg.teacher_column))
        else None
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    return engine, teacher


def _resume(
    engine: Any, loss: LossState, rotation: Tensor | None, rows_per_batch: int
) -> tuple[dict[str, int], list[Any], Tensor | None]:
    """Position (step, epoch, row in epoch), loss state, metric history and the pca rotation the run
    started with, from the latest checkpoint (frozen weights, absent from it, stay as built). A checkpoint
    that another number of workers saved (elastic training) is loaded through its universal form."""
    import ray.train

    state, history = {"step": 0, "epoch": 0, "row_in_epoch": 0}, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        world = ray.train.get_context().get_world_size()
        with checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
            saved = saved_world_size(d)
            source = to_universal(d, tmp) if saved and saved != world else d
            engine._config.load_universal_checkpoint = source != d
            _, client = engine.load_checkpoint(
                source, tag=CKPT_TAG, load_module_strict=not has_lora(engine.module)
            )
            engine._config.load_universal_checkpoint = False
            if Path(d, HISTORY).is_file():
                history = json.loads(Path(d, HISTORY).read_text())
            rotation = saved_rotation(d, rotation)
        if "batch_in_epoch" in client:  # a checkpoint from before row counts: its batches were all full
            client["row_in_epoch"] = client["batch_in_epoch"] * rows_per_batch
        state.update({k: int(client[k]) for k in state})
        loss.load_state_dict(client)
    return state, [h for h in history if h["step"] <= state["step"]], rotation


def _epoch_batches(
    shard: Any, cfg: TrainConfig, state: dict[str, int], rank: int, world: int
) -> Iterator[tuple[int, Any]]:
    """(rows in the global batch, this worker's slice or None) for each global batch of the epoch from
    row `row_in_epoch` on: the same order on every worker and for any number of workers (order.py)."""
    stream = shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy")
    rows = epoch_order(stream, cfg.shuffle_buffer, cfg.seed, state["epoch"])
    for batch in global_batches(rows, state["row_in_epoch"], cfg.batch_size * world):
        yield num_rows(batch), worker_slice(batch, rank, world)


def _step(cfg: TrainConfig, engine: Any, fixed: tuple[Any, LossState, Tensor | None], batch: Any,
          at: tuple[int, int, int], watch: Watch) -> tuple[float, dict[str, Tensor], int, float]:  # fmt: skip
    """The optimizer step after step `at` = (epoch, step, rank) on this worker's rows, its phases marked
    on `watch`: (the loss, its terms' unweighted values, the tokens this worker's model read, seconds)."""
    started, (teacher, loss_state, rotation) = time.perf_counter(), fixed
    # seeded by position: a resumed run samples the same FlagEmbedding groups it would have
    rng, step = np.random.default_rng([cfg.seed, *at]), at[1] + 1
    terms: dict[str, Tensor] = {}
    towers, loss_of = objective(cfg, batch, teacher, engine.device, loss_state.loss_fn, rotation, rng, terms)
    watch.at(step, "forward and backward")
    seen: Counter[str] = Counter()
    loss = float(backward_step(engine, cfg, towers, loss_of, seen))
    watch.at(step, "optimizer step")
    engine.step()
    loss_state.step()
    return loss, terms, seen["tokens"], time.perf_counter() - started


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: config = {"cfg": TrainConfig fields, "rotation": pca axes or None,
    "board": the run's hang.Board or None}. An error in a collective is raised as a CollectiveError that
    names the step, the phase and the collective (hang.py)."""
    cfg = TrainConfig(**config["cfg"])
    import ray.train

    bound_collectives(cfg.collective_timeout_s)  # DeepSpeed's own groups too
    init_deepspeed(cfg.use_gpu)
    torch.manual_seed(cfg.seed)
    watch = Watch(ray.train.get_context().get_world_rank(), cfg.collective_timeout_s, config.get("board"))
    try:
        _train(cfg, config, watch)
    except Exception as e:
        if (explained := watch.explain(e)) is None:
            raise
        raise explained from e


def _train(cfg: TrainConfig, config: dict[str, Any], watch: Watch) -> None:
    import ray.train
    import ray.train.torch

    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    rotation = None if config["rotation"] is None else torch.as_tensor(config["rotation"])
    fixed = {"base_mem_mb": peak_memory_mb(device)}  # the process before any model: Python, torch, Ray
    watch.at(0, "engine start")
    engine, teacher = _build(cfg, device, rotation)
    loss_state = LossState(build_loss(cfg).to(device), cfg.scale_lr)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    watch.at(0, "resume")
    state, history, rotation = _resume(engine, loss_state, rotation, cfg.batch_size * world)
    models = (teacher, loss_state, rotation)  # the rotation a resumed run started with
    fixed["resumed_from"], started = state["step"], time.perf_counter()
    tracker, logged = tracked.for_worker(cfg, config.get("tracking_run_id")) if rank == 0 else (None, -1)
    logged = tracked.backfill(tracker, history, logged)
    shard = ray.train.get_dataset_shard("train")
    max_steps = cfg.max_steps or 10**12
    metrics: dict[str, float] = {"loss": float("nan")}
    saved, last_report, fixed["rows_left_out"], fixed["checkpoint_failures"] = -1, 0.0, 0, 0
    while state["epoch"] < cfg.epochs and state["step"] < max_steps:
        it = _epoch_batches(shard, cfg, state, rank, world)
        while state["step"] < max_steps:
            watch.at(state["step"] + 1, "reading the batch")
            rows, batch = next(it, (0, None))
            due = time.perf_counter() - last_report >= cfg.report_interval_s
            ready, report = agree(batch is not None, due, device)  # same answers on every worker
            if not ready:
                fixed["rows_left_out"] += rows  # an epoch's last rows, fewer than the workers
                break
            assert batch is not None
            fixed["rows_left_out"] += rows - world * num_rows(batch)  # a short last batch's remainder
            loss, terms, tokens, seconds = _step(
                cfg, engine, models, batch, (state["epoch"], state["step"], rank), watch
            )
            at = {"epoch": state["epoch"], "row": state["row_in_epoch"], "rows": rows, "workers": world}
            state["step"], state["row_in_epoch"] = state["step"] + 1, state["row_in_epoch"] + rows
            extra = loss_state.metrics()  # e.g. a learnable scale
            metrics = {"loss": loss, "peak_mem_mb": peak_memory_mb(device)} | fixed | extra
            history.append(
                {"step": state["step"], "loss": loss, "time_s": time.perf_counter() - started} | at | extra
            )
            if tracker is not None and state["step"] > logged:  # a resumed run's steps are logged once
                took, lr = (rows, tokens, seconds), engine.get_lr()[0]
                tracker.log_metrics(tracked.step_metrics(metrics, terms, lr, took), state["step"])
            if state["step"] % cfg.checkpoint_every == 0 or report:
                kept = (history, loss_state, rotation)
                saved = _checkpoint_or_report(cfg, engine, state, metrics, kept, fixed, watch) or saved
                last_report = time.perf_counter()
        else:
            break
        state["epoch"], state["row_in_epoch"] = state["epoch"] + 1, 0
    if tracker is not None:
        tracker.close(None)  # flushed; the export task ends the run
    if saved != state["step"] or state["step"] == 0:
        watch.at(state["step"], "checkpoint")
        metrics |= fixed | {"peak_mem_mb": peak_memory_mb(device)}
        if not _save_and_report(engine, state, metrics, history, loss_state, rotation):
            raise RuntimeError(f"the final checkpoint (step {state['step']}) could not be uploaded")
