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
import tempfile
from pathlib import Path
from typing import Any

import torch

from rayembed.io import (
    detect_format,
    download_dir,
    files_under,
    filesystem,
    is_file,
    is_s3,
    join,
    publish,
    strip_scheme,
)
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


def local_source(source: str, endpoint_url: str | None, scratch: Path) -> str:
    """A local path for one source: an s3:// model folder is this node's cached copy (as every job loads
    it); an s3:// DeepSpeed checkpoint folder is downloaded into `scratch`; a registered model (models:/)
    is its cached copy too; aliases and local paths stay."""
    if source.startswith("models:/"):
        return str(resolve_model_path(source))
    if not is_s3(source):
        return source
    if is_file(join(source, "latest"), endpoint_url):
        return str(download_dir(source, scratch, endpoint_url))
    return str(resolve_model_path(source, endpoint_url))


def calibration_texts(cfg: MergeConfig) -> list[str]:
    """The first `int8_calibration_texts` texts of `calibration_texts` (JSONL or Parquet, file or folder,
    local or s3://)."""
    import pyarrow.dataset as pads

    path, fs = str(cfg.calibration_texts), filesystem(str(cfg.calibration_texts), cfg.s3_endpoint_url)
    if not (files_under(path, "", cfg.s3_endpoint_url) if fs else Path(path).exists()):
        raise FileNotFoundError(f"merge: calibration_texts {path} does not exist")
    data = pads.dataset(strip_scheme(path), format=detect_format(path, fs), filesystem=fs)
    if cfg.text_column not in data.schema.names:
        raise ValueError(f"merge: {path} has no column {cfg.text_column!r} (columns: {data.schema.names})")
    return data.head(cfg.int8_calibration_texts, columns=[cfg.text_column]).column(0).to_pylist()


def merge(cfg: MergeConfig) -> dict[str, object]:
    """Average `cfg.models` (local or s3://) into one model written to `cfg.output` (local or s3://)."""
    texts = calibration_texts(cfg) if cfg.calibration_texts else None  # bad texts fail before merging
    with tempfile.TemporaryDirectory() as tmp:
        url = cfg.s3_endpoint_url
        sources = [local_source(m, url, Path(tmp, str(i))) for i, m in enumerate(cfg.models)]
        base = Embedder.load(
            local_source(cfg.base, url, Path(tmp, "base")) if cfg.base else sources[0], device="cpu"
        )
        weights = cfg.weights or [1.0] * len(cfg.models)
        frame = common_frame(cfg.models, [frame_of(m, base) for m in sources])  # before any weights load
        states = [state_of(m, base) for m in sources]
    merged = with_weights(base, soup(states, weights), "the merged weights")
    merged.frame = frame
    merged.name = cfg.name or f"{base.name}-soup{len(cfg.models)}"
    widths = [w for w in base.int8_scales if w < merged.dim]  # where the ingredients were calibrated
    merged.int8_scales = {}  # the base's scales were fitted to other weights
    if texts is not None:
        merged.calibrate_int8(texts, widths)
    summary: dict[str, object] = {
        "output": cfg.output,
        "models": cfg.models,
        "weights": weights,
        "name": merged.name,
        "int8_scales": {str(w): s for w, s in sorted(merged.int8_scales.items())},
    }
    report = merge_eval(cfg, base, states, merged, summary) if cfg.eval else None
    summary["output"] = publish(lambda out: write_merge(merged, out, report), cfg.output, url)
    if report:
        summary["eval"] = report["table"]
    return summary


def merge_eval(
    cfg: MergeConfig, base: Embedder, states: list[dict[str, torch.Tensor]], merged: Embedder, summary: dict
) -> dict[str, Any]:
    """Every ingredient and the soup evaluated alike: merge_report.md's table and merge_report.json."""
    from rayembed.eval.config import EvalConfig
    from rayembed.eval.job import evaluate
    from rayembed.train.report import eval_rows

    settings = EvalConfig(**{"s3_endpoint_url": cfg.s3_endpoint_url, **(cfg.eval or {}), "output": None})
    evals = {m: evaluate(settings, with_weights(base, s, m)) for m, s in zip(cfg.models, states, strict=True)}
    evals["soup"] = evaluate(settings, merged)
    header, rows = eval_rows(evals)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]
    return {
        "md": "# Merge report\n\n" + "\n".join(lines) + "\n",
        "json": json.dumps({**summary, "eval": evals}, indent=2) + "\n",
        "table": {"columns": header[1:], **{r[0]: r[1:] for r in rows}},
    }


def write_merge(merged: Embedder, out: Path, report: dict[str, Any] | None) -> None:
    merged.save(out)
    if report:
        (out / "merge_report.md").write_text(report["md"])
        (out / "merge_report.json").write_text(report["json"])
