"""Checkpoint merging (model souping): a weighted average of models of one architecture.

Sources are sentence-transformers folders (e.g. several runs' exported models) or Ray Train /
DeepSpeed checkpoint folders of one run (consolidated from their ZeRO shards; `base` gives the
architecture and tokenizer). The result is a normal model folder that `rayembed eval`, `embed`
and `serve` use as they are. With an `eval` section, every ingredient and the soup are evaluated the
same way and the comparison is written next to the weights (merge_report.json / .md).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from rayembed.model import Embedder
from rayembed.model.layout import read_layout, resolve_model_path
from rayembed.model.pca import frame_id
from rayembed.train.config import MergeConfig
from rayembed.train.export import checkpoint_state, saved_rotation


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "latest").is_file()


def state_of(source: str, base: Embedder | None) -> dict[str, torch.Tensor]:
    """fp32 weights of one source, keyed like `Embedder.state_dict()`."""
    if is_deepspeed_checkpoint(source):
        if base is None:
            raise ValueError(
                f"{source} is a DeepSpeed checkpoint: set base= to the model it was trained from"
            )
        state = checkpoint_state(source)
        if any(".lora_" in k for k in state):
            raise ValueError(
                f"{source} holds LoRA adapters, not a whole model: merge the runs' exported models "
                "(<output_dir>/model, adapters merged) instead"
            )
        return {k: v.float() for k, v in state.items()}
    return {k: v.float() for k, v in Embedder.load(source, device="cpu").state_dict().items()}


def frame_of(source: str, base: Embedder | None) -> str | None:
    """The output axes' id of one source (pca.frame_id): a model folder's own, or for a DeepSpeed
    checkpoint the base turned by the run's saved pca rotation (the base as the run started from it, or
    already turned by that rotation alone, e.g. the run's export); None where nothing says."""
    if not is_deepspeed_checkpoint(source):
        return read_layout(resolve_model_path(source)).frame
    rotation, before = saved_rotation(source), base.frame if base is not None else None
    if rotation is None:
        return before
    own = frame_id(rotation.numpy())
    return own if before == own else frame_id(rotation.numpy(), before)


def common_frame(sources: list[str], frames: list[str | None]) -> str | None:
    """The one frame of the sources that record one; different frames are refused: runs that fitted
    their own pca rotation emit coordinates along different axes, and averaging those mixes them."""
    known = {f for f in frames if f}
    if len(known) > 1:
        by = ", ".join(f"{s} ({f})" for s, f in zip(sources, frames, strict=True))
        raise ValueError(
            f"merge: the models' outputs are on different axes (pca_rotation fitted per run): {by}. "
            "Merge checkpoints or runs that share one rotation"
        )
    return next(iter(known), None)


def soup(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i * state_i / sum_i w_i, after checking that every state has the same keys and shapes."""
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise ValueError(f"model {i} does not match model 0 (different keys or shapes): cannot merge")
    total = sum(weights)
    return {k: sum(w * s[k] for s, w in zip(states, weights, strict=True)) / total for k in states[0]}  # type: ignore[misc]


def with_weights(base: Embedder, state: dict[str, torch.Tensor], what: str) -> Embedder:
    """A copy of `base` holding `state`; every weight must fit."""
    return copy.deepcopy(base).load_weights(state, what)


def calibration_texts(cfg: MergeConfig) -> list[str]:
    """The first `int8_calibration_texts` texts of `calibration_texts` (JSONL or Parquet, file or folder)."""
    import pyarrow.dataset as pads

    from rayembed.io import detect_format

    path = str(cfg.calibration_texts)
    if not Path(path).exists():
        raise FileNotFoundError(f"merge: calibration_texts {path} does not exist")
    data = pads.dataset(path, format=detect_format(path, None))
    if cfg.text_column not in data.schema.names:
        raise ValueError(f"merge: {path} has no column {cfg.text_column!r} (columns: {data.schema.names})")
    return data.head(cfg.int8_calibration_texts, columns=[cfg.text_column]).column(0).to_pylist()


def merge(cfg: MergeConfig) -> dict[str, object]:
    texts = calibration_texts(cfg) if cfg.calibration_texts else None  # bad texts fail before merging
    base = Embedder.load(cfg.base or cfg.models[0], device="cpu")
    weights = cfg.weights or [1.0] * len(cfg.models)
    frame = common_frame(cfg.models, [frame_of(m, base) for m in cfg.models])  # before any weights load
    states = [state_of(m, base) for m in cfg.models]
    merged = with_weights(base, soup(states, weights), "the merged weights")
    merged.frame = frame
    merged.name = cfg.name or f"{base.name}-soup{len(cfg.models)}"
    widths = [w for w in base.int8_scales if w < merged.dim]  # where the ingredients were calibrated
    merged.int8_scales = {}  # the base's scales were fitted to other weights
    if texts is not None:
        merged.calibrate_int8(texts, widths)
    out = merged.save(cfg.output)
    summary: dict[str, object] = {
        "output": str(out),
        "models": cfg.models,
        "weights": weights,
        "name": merged.name,
        "int8_scales": {str(w): s for w, s in sorted(merged.int8_scales.items())},
    }
    if cfg.eval:
        from rayembed.eval.config import EvalConfig
        from rayembed.eval.job import evaluate
        from rayembed.train.report import eval_rows

        settings = EvalConfig(**{**cfg.eval, "output": None})
        evals = {
            m: evaluate(settings, with_weights(base, s, m)) for m, s in zip(cfg.models, states, strict=True)
        }
        evals["soup"] = evaluate(settings, merged)
        header, rows = eval_rows(evals)
        table = [
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows],
        ]
        (out / "merge_report.md").write_text("# Merge report\n\n" + "\n".join(table) + "\n")
        (out / "merge_report.json").write_text(json.dumps({**summary, "eval": evals}, indent=2) + "\n")
        summary["eval"] = {"columns": header[1:], **{r[0]: r[1:] for r in rows}}
    return summary
