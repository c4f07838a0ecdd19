"""The one embedding model: HF backbone + pooling (+ optional Dense) + L2 normalise, and `encode`.

Training-time eval, the Ray Data UDF and the Serve deployment all call `Embedder.encode`, so the same
text gives the same vector everywhere. Pooling kinds (pooling.py), backbone loading and layer stacks
(backbone.py) and the sentence-transformers folder layout (layout.py) live in their own modules.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local folders only, never a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()  # load reports about the unused HF pooler are noise here
hf_logging.disable_progress_bar()

from rayembed.model.backbone import layer_stack, load_backbone  # noqa: E402
from rayembed.model.batching import Tokens, length_batches, pad_batch, validate_texts  # noqa: E402
from rayembed.model.layout import Layout, read_layout, resolve_model_path, write_layout  # noqa: E402
from rayembed.model.pooling import POOLINGS, pool  # noqa: E402
from rayembed.model.vectors import PRECISIONS, postprocess  # noqa: E402

MIN_TOKENIZE_PART = 256  # texts per tokenizer thread, at least: fewer are not worth a thread


class Embedder(nn.Module):
    """Transformer backbone + mean/CLS pooling + optional L2 normalisation."""

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        pooling: str = "mean",
        normalize: bool = True,
        max_length: int = 256,
        name: str = "",
        prompts: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
        self.backbone: Any = backbone  # an HF PreTrainedModel (save_pretrained, config)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        self.name = name
        self.prompts = dict(prompts or {})  # prompt name -> prefix (sentence-transformers `prompts`)
        # Threads that tokenize in parallel (the Rust tokenizer drops the GIL). 1 on one-CPU workers;
        # GPU actors raise it, as tokenizing is what a GPU waits on (docs/benchmarks.md).
        self.tokenize_threads = 1
        # Optional bias-free linear layer after pooling (sentence-transformers `Dense`, identity
        # activation); `rotate` sets it to an orthogonal matrix (PCA axes for Matryoshka prefixes).
        self.projection: nn.Linear | None = None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def load(
        cls, name_or_path: str | os.PathLike[str], device: str | None = None, dtype: torch.dtype | None = None
    ) -> Embedder:
        """Load a sentence-transformers (or plain HF) folder; 'default' is the bundled MiniLM."""
        path = resolve_model_path(name_or_path)
        layout = read_layout(path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        max_length = int(layout.max_length or min(tokenizer.model_max_length, 512))
        backbone = load_backbone(path, dtype)
        model = cls(
            backbone, tokenizer, layout.pooling, layout.normalize, max_length, layout.name, layout.prompts
        )
        if layout.projection is not None:
            model.set_projection(layout.projection)
        model.eval()
        return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the sentence-transformers folder layout (loads with `SentenceTransformer(path)`)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        projection = self.projection.weight if self.projection is not None else None
        layout = Layout(self.pooling, self.normalize, self.max_length, self.name, self.prompts, projection)
        write_layout(out, layout, self.hidden_size, self.dim)
        return out

    def keep_layers(self, layers: Sequence[int]) -> Embedder:
        """Keep only these transformer layers, in this order (a student initialised from a bigger
        model's layers, as EmbeddingGemma is); embeddings and pooling are kept as they are."""
        owner, attr = layer_stack(self.backbone)
        stack = getattr(owner, attr)
        if not layers or any(not 0 <= i < len(stack) for i in layers):
            raise ValueError(f"layers must be indices in [0, {len(stack)}), got {list(layers)}")
        setattr(owner, attr, nn.ModuleList([stack[i] for i in layers]))
        self.backbone.config.num_hidden_layers = len(layers)
        return self

    def set_projection(self, weight: torch.Tensor) -> Embedder:
        """Put a bias-free linear layer `y = weight @ pooled` after pooling (before normalising)."""
        if weight.ndim != 2 or weight.shape[1] != self.hidden_size:
            raise ValueError(f"projection weight must be [out, {self.hidden_size}], got {list(weight.shape)}")
        param = next(self.backbone.parameters())
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight.data.copy_(weight)
        self.projection = layer.to(device=param.device, dtype=param.dtype)
        return self

    def rotate(self, rotation: np.ndarray | torch.Tensor) -> Embedder:
        """Rotate the output space: new embedding = old embedding @ rotation ([dim, dim], orthogonal, so
        full-width similarities are unchanged), composed with any projection the model already has."""
        r = torch.as_tensor(np.asarray(rotation), dtype=torch.float32)
        if r.shape != (self.dim, self.dim) or not torch.allclose(r.T @ r, torch.eye(self.dim), atol=1e-4):
            raise ValueError(f"rotation must be an orthogonal [{self.dim}, {self.dim}] matrix")
        old = self.projection.weight.detach().float().cpu() if self.projection is not None else None
        return self.set_projection(r.T if old is None else r.T @ old)

    def load_weights(self, state: dict[str, torch.Tensor], what: str = "the weights") -> Embedder:
        """Load a full state dict (e.g. consolidated from ZeRO shards), adding the projection layer it
        has if this model has none; every weight must fit."""
        if "projection.weight" in state and self.projection is None:
            self.set_projection(state["projection.weight"].float())
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise ValueError(f"{what} do not fit the model: missing={missing} unexpected={unexpected}")
        return self

    # ---- properties ---------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def dim(self) -> int:
        """Width of the embeddings: the projection's output if there is one, else the hidden size."""
        return self.projection.out_features if self.projection is not None else self.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- the math -----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layers: Sequence[int] | None = None,
        **kw: torch.Tensor,
    ) -> torch.Tensor:
        """Pooled (and, if configured, unit-length) embeddings of a tokenized batch: [B, dim].

        `layers` (training, 2D Matryoshka): also pool the output after each of these first-L-layer
        sub-models, which is what `keep_layers(range(L))` would give; returns [B, dim * (1 + len(layers))],
        the full model's embedding first, then one per entry of `layers`.
        """
        kw = {k: v for k, v in kw.items() if k == "token_type_ids"}
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(layers), **kw
        )
        pooled = [self._pool(out.last_hidden_state, attention_mask)]
        if layers:
            n = len(out.hidden_states) - 1
            if any(not 1 <= k <= n for k in layers):
                raise ValueError(
                    f"layers must be in [1, {n}] (sub-models of the first L layers), got {list(layers)}"
                )
            pooled += [self._pool(out.hidden_states[k], attention_mask) for k in layers]
        return torch.cat(pooled, dim=1) if layers else pooled[0]

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = pool(self.pooling, hidden, attention_mask)
        if self.projection is not None:
            pooled = self.projection(pooled.to(self.projection.weight.dtype)).float()
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Differentiable embeddings of raw texts (the training path)."""
        feats = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        return self(**feats)

    def with_prompt(self, texts: Sequence[str], prompt_name: str | None) -> list[str]:
        """Prefix texts with a named prompt of the model (e.g. 'query'); None: unchanged."""
        if prompt_name is None:
            return list(texts)
        if prompt_name not in self.prompts:
            raise ValueError(
                f"unknown prompt_name {prompt_name!r}; this model has {sorted(self.prompts) or 'none'}"
            )
        return [self.prompts[prompt_name] + t for t in texts]

    def tokenize_ids(self, texts: Sequence[str], prompt_name: str | None = None) -> Tokens:
        """Validate and tokenize (truncating to max_length) without padding: the CPU half of `encode`.

        Cut into `tokenize_threads` parts tokenized side by side; the result does not depend on it.
        """
        texts = self.with_prompt(validate_texts(texts), prompt_name)
        if not texts:
            return Tokens([], [])
        step = max(MIN_TOKENIZE_PART, -(-len(texts) // max(1, self.tokenize_threads)))
        parts = [texts[i : i + step] for i in range(0, len(texts), step)]
        if len(parts) == 1:
            done = [self._tokenize_part(parts[0])]
        else:
            with ThreadPoolExecutor(len(parts)) as pool:
                done = list(pool.map(self._tokenize_part, parts))
        return Tokens([x for p in done for x in p.ids], [x for p in done for x in p.truncated])

    def _tokenize_part(self, texts: list[str]) -> Tokens:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        over = [bool(e.overflowing) for e in enc.encodings] if enc.encodings else [False] * len(texts)
        return Tokens(enc["input_ids"], over)

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str] | Tokens,
        dim: int | None = None,
        precision: str = "float32",
        batch_size: int = 64,
        max_tokens: int | None = None,
        stats: dict[str, int] | None = None,
        prompt_name: str | None = None,
    ) -> np.ndarray:
        """Embed `texts` (or their `tokenize_ids`) -> array [n, dim] (float32, int8 or packed uint8 for binary).

        Texts are sorted by token length and cut into batches of at most `batch_size` rows and,
        if given, `max_tokens` padded tokens, so padding is small; the output keeps input order.
        `stats`, if given, accumulates `tokens` and `padded_tokens`; `prompt_name` picks one of the
        model's prompts (e.g. 'query') to prefix.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        ids = (texts if isinstance(texts, Tokens) else self.tokenize_ids(texts, prompt_name)).ids
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        pad_id = self.tokenizer.pad_token_id or 0
        for idx in length_batches([len(x) for x in ids], batch_size, max_tokens):
            input_ids, mask = pad_batch([ids[i] for i in idx], pad_id)
            out[idx] = self(input_ids.to(self.device), mask.to(self.device)).cpu().numpy()
            if stats is not None:
                stats["tokens"] = stats.get("tokens", 0) + int(mask.sum())
                stats["padded_tokens"] = stats.get("padded_tokens", 0) + mask.numel()
        self.train(was_training)
        return postprocess(out, dim, precision)
