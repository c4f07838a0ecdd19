"""Checkpoint merging (model souping): a weighted average of models of one architecture.

Sources are sentence-transformers folders (e.g. several runs' exported models) or Ray Train /
DeepSpeed checkpoint folders of one run (consolidated from their ZeRO shards; `base` gives the
architecture and tokenizer). The result is a normal model folder that `rayembed eval`, `embed`
and `serve` use as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rayembed.config import MergeConfig
from rayembed.model import Embedder


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "latest").is_file()


def state_of(source: str, base: Embedder | None) -> dict[str, torch.Tensor]:
    """fp32 weights of one source, keyed like `Embedder.state_dict()`."""
    if is_deepspeed_checkpoint(source):
        import os

        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if base is None:
            raise ValueError(
                f"{source} is a DeepSpeed checkpoint: set base= to the model it was trained from"
            )
        return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(source, tag="ds").items()}
    return {k: v.float() for k, v in Embedder.load(source, device="cpu").state_dict().items()}


def soup(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i * state_i / sum_i w_i, after checking that every state has the same keys and shapes."""
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise ValueError(f"model {i} does not match model 0 (different keys or shapes): cannot merge")
    total = sum(weights)
    return {k: sum(w * s[k] for s, w in zip(states, weights, strict=True)) / total for k in states[0]}  # type: ignore[misc]


def merge(cfg: MergeConfig) -> dict[str, object]:
    base = Embedder.load(cfg.base or cfg.models[0], device="cpu")
    weights = cfg.weights or [1.0] * len(cfg.models)
    merged = soup([state_of(m, base) for m in cfg.models], weights)
    missing, unexpected = base.load_state_dict(merged, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise ValueError(
            f"merged weights do not fit {cfg.base or cfg.models[0]}: missing={missing} unexpected={unexpected}"
        )
    base.name = cfg.name or f"{base.name}-soup{len(cfg.models)}"
    out = base.save(cfg.output)
    return {"output": str(out), "models": cfg.models, "weights": weights, "name": base.name}
