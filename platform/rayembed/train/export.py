"""From a run's checkpoints to model folders: the checkpoint file names, ZeRO consolidation, and the
export task that ends a run where `export_resources` say (a GPU or large-memory node, not the driver,
which stays small whatever the model): the final checkpoint as a plain model, its int8 scales, the eval
before/after, the model and run report published."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayembed.io import publish
from rayembed.model import Embedder
from rayembed.model.layout import mark_frame_fit, mark_role, mark_trained_in, model_revision
from rayembed.model.lora import has_lora, merge
from rayembed.tracking import Tracker, TrackingConfig, registry_env
from rayembed.train import tracked
from rayembed.train.config import TrainConfig
from rayembed.train.dist import import_deepspeed
from rayembed.train.pair import PAIR_DIR, teacher_in_frame, wants_pair
from rayembed.train.report import write_report
from rayembed.train.start import starting_model, trainable_model

CKPT_TAG = "ds"
HISTORY = "history.json"  # rank 0's per-step metrics, kept with each checkpoint
ROTATION = "pca_rotation.npy"  # the axes a pca_rotation run started with, kept with each checkpoint


def saved_rotation(checkpoint_dir: str | Path, default: Any = None) -> Any:
    """The pca rotation kept in a checkpoint folder (as a tensor), else `default`."""
    path = Path(checkpoint_dir, ROTATION)
    return torch.from_numpy(np.load(path)) if path.is_file() else default


def checkpoint_state(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint: every weight that trained (with LoRA: the adapters, a
    pooling head, an output layer; frozen weights are not in checkpoints). ZeRO stages 1-3 keep fp32
    masters in their partitions; stage 0 (plain data parallel) keeps the module's own weights (with
    bf16 training those are bf16, upcast here)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = Path(checkpoint_dir, (Path(checkpoint_dir) / "latest").read_text().strip())
    plain = tag_dir / "mp_rank_00_model_states.pt"
    if plain.is_file():  # stage 0 writes this one file; ZeRO stages write per-rank files instead
        state = torch.load(plain, map_location="cpu", weights_only=False)
        if state.get("param_shapes") is None:
            return {k: v.float() for k, v in state["module"].items()}
    return get_fp32_state_dict_from_zero_checkpoint(
        str(checkpoint_dir), tag=CKPT_TAG, exclude_frozen_parameters=True
    )


def consolidate(checkpoint_dir: str | Path, cfg: TrainConfig) -> Embedder:
    """The trained model of a run's checkpoint on CPU, as a plain model: the starting model (start.py,
    turned by the run's pca rotation: its frame) with the checkpoint's weights, LoRA adapters merged."""
    model = trainable_model(cfg, starting_model(cfg, "cpu", saved_rotation(checkpoint_dir)))
    state = checkpoint_state(checkpoint_dir)
    model.load_weights(state, f"the checkpoint's weights (base {cfg.model})", partial=has_lora(model))
    # The base model's max length is kept unless export_max_length says otherwise: `max_length` in training
    # is a speed setting, not the model's limit.
    if cfg.export_max_length:
        model.set_max_length(cfg.export_max_length)
    return merge(model)


def saved_world_size(checkpoint_dir: str | Path) -> int:
    """Workers that saved a checkpoint: its ZeRO optimizer shards (0 without ZeRO: one file for all)."""
    return len(list(Path(checkpoint_dir, CKPT_TAG).glob("*optim_states.pt")))


def to_universal(checkpoint_dir: str | Path, out: str | Path) -> Path:
    """DeepSpeed's universal form of a ZeRO checkpoint (one file per parameter and optimizer moment, no
    partitioning), which an engine of any world size loads with `load_universal_checkpoint`. Returns the
    folder to load from (tag CKPT_TAG inside)."""
    import argparse

    import_deepspeed()
    from deepspeed.checkpoint.ds_to_universal import main as convert

    args = {"num_extract_workers": 1, "num_merge_workers": 1, "keep_temp_folder": False, "strict": True}
    convert(
        argparse.Namespace(
            input_folder=str(Path(checkpoint_dir, CKPT_TAG)),
            output_folder=str(Path(out, CKPT_TAG)),
            inject_missing_state=True,  # checkpoint info Megatron would add; not needed for plain data parallel
            **args,
        )
    )
    return Path(out)


def export_options(cfg: TrainConfig, nodes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Ray options of the export task, then `export_resources`. Default: the CPUs the training workers
    held, free once they end (num_workers x cpus_per_worker; one worker's with use_gpu, and 1 GPU), at
    most the largest of `nodes` (ray.nodes()) has: its evals and int8 calibration run on as many threads."""
    registry = registry_env(cfg.model, cfg.teacher)
    env = {"runtime_env": {"env_vars": registry}} if registry else {}
    cpus = cfg.cpus_per_worker * (1 if cfg.use_gpu else cfg.num_workers)
    alive = [n["Resources"].get("CPU", 0.0) for n in nodes or [] if n.get("Alive")]
    cpus = max(1.0, min(cpus, max(alive)) if alive else cpus)
    return {"num_cpus": cpus, "num_gpus": 1 if cfg.use_gpu else 0, **env, **cfg.export_resources}


def warn_if_no_node_fits_export(cfg: TrainConfig) -> None:
    """Say before training when no node of the cluster has the export's resources (the export would wait
    for one after the last step: an autoscaler may add it, a fixed cluster never will)."""
    import ray

    nodes = ray.nodes()
    options = export_options(cfg, nodes)
    if not export_fits(options, nodes):
        print(f"train: no node has the export's resources {options} now; after training the export waits for "
              "one (an autoscaler adds it; else lower export_resources). Checkpoints are kept either way",
              flush=True)  # fmt: skip


def export_fits(options: dict[str, Any], nodes: list[dict[str, Any]]) -> bool:
    """Whether one of `nodes` (ray.nodes()) has the export task's resources in total."""
    want = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0),
            "memory": options.get("memory", 0), **options.get("resources", {})}  # fmt: skip
    return any(
        n.get("Alive") and all(n["Resources"].get(k, 0) >= v for k, v in want.items() if v) for n in nodes
    )


def export_run(
    cfg: TrainConfig, checkpoint: Any, rotation: Any, texts: list[str], summary: dict[str, Any]
) -> dict[str, Any]:
    """Run `finish` as a Ray task placed by `export_options` and wait for it; returns the summary."""
    import ray

    task = ray.remote(finish).options(**export_options(cfg, ray.nodes()))
    return ray.get(task.remote(cfg, checkpoint, rotation, texts, summary))


def finish(
    cfg: TrainConfig, checkpoint: Any, rotation: Any, texts: list[str], summary: dict[str, Any]
) -> dict[str, Any]:
    """The end of a run (the export task): the final checkpoint (a ray.train.Checkpoint, local or s3://)
    as a plain model, int8 scales from `texts`, the run's eval, and `<output_dir>/model` and `/report`
    published. Returns `summary` with output_dir, report and where and how long the export ran."""
    import ray

    started = time.perf_counter()
    if ray.is_initialized():  # the task's CPUs (Ray may have set one thread for the process)
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    with checkpoint.as_directory() as d:
        model = consolidate(d, cfg)
        history = json.loads(Path(d, HISTORY).read_text()) if Path(d, HISTORY).is_file() else []
        rotation = saved_rotation(d, rotation)
    model.name, model.prompts = f"{model.name}-{cfg.run_name}", exported_prompts(cfg, model)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    calibrate(cfg, model, texts)
    root = cfg.output_dir.rstrip("/")
    teacher = teacher_in_frame(cfg, model, rotation) if wants_pair(cfg) else None  # sets the student's frame
    evals = run_evals(cfg, model, rotation, teacher)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    summary["export"] = {"node_id": node, "pid": os.getpid()}
    tracker = tracked.finish(cfg, summary, evals)
    revision: list[str] = []  # of the folder as written, before an s3:// output's temporary one goes

    fit = summary.get("pca_fit")  # what the frame's axes were fitted on: the folders say so for embed jobs

    def save(path: Path, model: Embedder = model, role: str = "query") -> None:
        model.save(path)
        if teacher is not None:
            mark_role(path, role)
        if fit:
            mark_frame_fit(path, fit)
        if tracker is not None:  # jobs on the folder link to this run (rayembed.json, not in the revision)
            mark_trained_in(
                path, {"backend": TrackingConfig(**cfg.tracking or {}).backend, "run_id": tracker.run_id}
            )
            revision.append(model_revision(path))

    # the run's artifact per exported step: a registered version's files never change, even when the
    # run is resumed and exported again (one `model` folder was overwritten, version 1 became version 2)
    artifact = f"model/step-{summary.get('step', 0)}"
    summary = {"output_dir": published(save, f"{root}/model", cfg, tracker, artifact), **summary}
    if teacher is not None:  # beside the student: the corpus's encoder in the same frame
        calibrate(cfg, teacher, texts)
        out = published(lambda p: save(p, teacher, "document"), f"{root}/{PAIR_DIR}", cfg, tracker,
                        f"{PAIR_DIR}/step-{summary.get('step', 0)}")  # fmt: skip
        summary["pair"] = {"document_model": out, "frame": teacher.frame}
    if tracker is not None:
        tags = model_tags(cfg, model, revision[0])
        summary["tracking"] |= {"registered": tracked.register(cfg, tracker, artifact, tags)}
    summary["export"]["wall_s"] = round(time.perf_counter() - started, 1)
    summary["report"] = published(
        lambda p: write_report(p, summary, history, evals), f"{root}/report", cfg, tracker
    )
    if tracker is not None:
        summary["tracking"] |= tracker.close("FINISHED")
    return summary


def model_tags(cfg: TrainConfig, model: Embedder, revision: str) -> dict[str, str]:
    """Tags of a registered version: the run, the model's revision (its content hash, as the endpoint and
    the embed manifest name it), its output frame (pca-rotated models: the axes' id, which merge and
    index-compatible pairs compare), width, Matryoshka widths and the precisions it is calibrated for."""
    return {
        "rayembed.run_name": cfg.run_name,
        "rayembed.revision": revision,
        **({"rayembed.frame": model.frame} if model.frame else {}),
        "rayembed.width": str(model.dim),
        "rayembed.matryoshka_dims": ",".join(map(str, cfg.matryoshka_dims)),
        "rayembed.precisions": "float32,int8,binary",
    }


def published(
    write: Any, out: str, cfg: TrainConfig, tracker: Tracker | None, artifact: str | None = None
) -> str:
    """`publish` (local or s3://), and the folder logged as the tracked run's artifact `artifact` (default:
    the folder's name)."""
    if tracker is None:
        return publish(write, out, cfg.s3_endpoint_url)

    def write_and_log(path: Path) -> None:
        write(path)
        tracker.log_artifacts(str(path), artifact or out.rsplit("/", 1)[-1])
        tracker.flush()  # before a temporary folder (s3:// outputs) goes

    return publish(write_and_log, out, cfg.s3_endpoint_url)


def calibrate(cfg: TrainConfig, model: Embedder, texts: list[str]) -> None:
    """The exported model's int8 scales from its vectors of `texts`, at full width and each Matryoshka width."""
    if texts:
        model.calibrate_int8(texts, [d for d in cfg.matryoshka_dims if d < model.dim])


def exported_prompts(cfg: TrainConfig, model: Embedder) -> dict[str, str]:
    """The model's prompts plus the run's: `prompts`, and `query` from query_instruction."""
    query = (
        {"query": cfg.instruction_template.format(task=cfg.query_instruction)}
        if cfg.query_instruction
        else {}
    )
    return {**model.prompts, **cfg.prompts, **query}


def run_evals(
    cfg: TrainConfig, trained: Embedder, rotation: Any, documents: Embedder | None = None
) -> dict[str, Any] | None:
    """The run's `eval` section applied to the starting model (rotated as training started) and to the
    trained one; both get the run's prompts, and queries its `query` prompt when it trained with one. With
    the pair's `documents` encoder, the trained model's queries are scored against it too (`beir_pair`)."""
    if not cfg.eval:
        return None
    from rayembed.eval.config import EvalConfig
    from rayembed.eval.job import evaluate

    before = starting_model(cfg, str(trained.device), rotation)
    before.prompts = exported_prompts(cfg, before)
    query = {"query_prompt_name": "query"} if cfg.query_instruction else {}
    settings = {
        "s3_endpoint_url": cfg.s3_endpoint_url,
        "teacher": cfg.teacher,  # the retention check's bar (eval corpus=), unless the section names another
        **query,
        **cfg.eval,
        "model": cfg.model,
        "output": None,
    }
    return {
        "before": evaluate(EvalConfig(**settings), before),
        "after": evaluate(EvalConfig(**settings), trained, documents),
    }
