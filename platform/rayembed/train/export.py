"""From a run's checkpoints to model folders: the checkpoint file names and ZeRO consolidation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayembed.model import Embedder
from rayembed.model.lora import has_lora, merge
from rayembed.train.config import TrainConfig
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
