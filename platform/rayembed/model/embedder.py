"""The one embedding model: HF backbone + pooling (+ optional Dense) + L2 normalise, and `encode`.

Training-time eval, the Ray Data UDF and the Serve deployment all call `Embedder.encode`, so the same
text gives the same vector everywhere. Encoders and decoders alike: pooling kinds (pooling.py, with the
NV-Embed head in latent_attention.py), families, attention and layer stacks (backbone.py), tokenizer
behaviour (tokenizer.py) and the sentence-transformers folder layout (layout.py) live in their own
modules; this one keeps the math.
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

from rayembed.model import backbone as families  # noqa: E402
from rayembed.model.batching import Text, Tokens, length_batches, pad_batch, validate_texts  # noqa: E402
from rayembed.model.latent_attention import LatentAttention  # noqa: E402
from rayembed.model.layout import Layout, read_layout, resolve_model_path, write_layout  # noqa: E402
from rayembed.model.pca import frame_id  # noqa: E402
from rayembed.model.pooling import POOLINGS, pool, pool_mask  # noqa: E402
from rayembed.model.rope import scale_rope  # noqa: E402
from rayembed.model.tokenizer import prepare_tokenizer, save_tokenizer  # noqa: E402
from rayembed.model.vectors import PRECISIONS, calibrate_int8, postprocess, unit  # noqa: E402

MIN_TOKENIZE_PART = 256  # texts per tokenizer thread, at least: fewer are not worth a thread


class Embedder(nn.Module):
    """Transformer backbone (encoder or decoder) + pooling + optional Dense + optional L2 normalisation."""

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        pooling: str = "mean",
        normalize: bool = True,
        max_length: int = 256,
        name: str = "",
        prompts: dict[str, str] | None = None,
        include_prompt: bool = True,
    ) -> None:
        super().__init__()
        self.backbone: Any = backbone  # an HF PreTrainedModel (save_pretrained, config), or a peft wrapper
        self.tokenizer = tokenizer
        self.normalize = normalize
        self.max_length = max_length
        self.name = name
        self.prompts = dict(prompts or {})  # prompt name -> prefix (sentence-transformers `prompts`)
        self.include_prompt = include_prompt  # False: pooling leaves the prompt's tokens out
        # Threads that tokenize in parallel (the Rust tokenizer drops the GIL). 1 on one-CPU workers;
        # GPU actors raise it, as tokenizing is what a GPU waits on (docs/benchmarks.md).
        self.tokenize_threads = 1
        # Optional bias-free linear layer after pooling (sentence-transformers `Dense`, identity
        # activation); `rotate` sets it to an orthogonal matrix (PCA axes for Matryoshka prefixes).
        self.projection: nn.Linear | None = None
        self.latent: LatentAttention | None = None  # the latent_attention pooling head
        self.attention: str | None = None  # decoders: causal | bidirectional; None: as trained
        self._mask_4d = False  # bidirectional without a native switch: forward passes a 4D mask
        self._prompt_lengths: dict[str, int] = {}
        self.int8_scales: dict[int, float] = {}  # width -> int8 scale (`calibrate_int8`); {}: 127
        self.frame: str | None = None  # id of the output axes `rotate` turned to (pca.frame_id)
        self.rope_scaling: dict[str, Any] | None = None  # set_rope_scaling's (saving keeps it: config.json)
        self.set_pooling(pooling)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        name_or_path: str | os.PathLike[str],
        device: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Embedder:
        """Load a sentence-transformers (or plain HF) folder; 'default' is the bundled MiniLM. Weights in
        `dtype` (default float32, whatever the checkpoint's own). A plain decoder folder pools by its last
        token, a plain encoder by the mean. While transformers' DeepSpeed ZeRO-3 integration is live
        (train.start.zero3_init) the backbone is built partitioned and left where DeepSpeed puts it."""
        from transformers.integrations import is_deepspeed_zero3_enabled

        path = resolve_model_path(name_or_path)
        layout = read_layout(path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        backbone = families.load_backbone(path, dtype or torch.float32, families.attn_implementation(device))
        pooling = layout.pooling or ("lasttoken" if families.is_decoder(backbone) else "mean")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        max_length = int(layout.max_length or min(tokenizer.model_max_length, 512))
        first = "mean" if layout.latent is not None else pooling  # the saved head, not a new random one
        model = cls(backbone, tokenizer, first, layout.normalize, max_length, layout.name, layout.prompts)
        model.include_prompt = layout.include_prompt
        if layout.attention is not None:
            model.set_attention(layout.attention)
        if layout.latent is not None:
            model.latent = layout.latent
            model.set_pooling(pooling)
        if layout.projection is not None:
            model.set_projection(layout.projection)
        model.int8_scales, model.frame = layout.int8_scales, layout.frame
        model.eval()
        return model if is_deepspeed_zero3_enabled() else model.to(device)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the sentence-transformers folder layout (mean/cls/lasttoken: loads with
        `SentenceTransformer(path)`). LoRA adapters must be merged first (lora.merge)."""
        if hasattr(self.backbone, "peft_config"):
            raise ValueError(
                "merge the LoRA adapters into the backbone before saving (rayembed.model.lora.merge)"
            )
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out, safe_serialization=True)
        save_tokenizer(self.tokenizer, out)
        projection = self.projection.weight if self.projection is not None else None
        layout = Layout(
            self.pooling, self.normalize, self.max_length, self.name, self.prompts, projection,
            self.include_prompt, self.attention, self.latent, self.int8_scales, self.frame,
        )  # fmt: skip
        write_layout(out, layout, self.hidden_size, self.dim)
        return out

    def set_pooling(self, pooling: str, **latent: int) -> Embedder:
        """Pool by `pooling` (pooling.POOLINGS); latent_attention adds its head (sized by `latent`:
        num_latents, heads, mlp_ratio) unless the model has one."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
        prepare_tokenizer(self.tokenizer, pooling)
        self.pooling = pooling
        if pooling == "latent_attention" and self.latent is None:
            head = LatentAttention(self.hidden_size, **latent)
            self.latent = head.to(device=self.device, dtype=next(self.backbone.parameters()).dtype)
        elif pooling != "latent_attention":
            self.latent = None
        return self

    def set_max_length(self, max_length: int) -> Embedder:
        """Read up to `max_length` tokens of a text (e.g. a long-context model's 8k-32k), no more than the
        backbone's positions (`max_position_embeddings`)."""
        limit = getattr(self.backbone.config, "max_position_embeddings", None)
        if max_length < 1 or (limit and max_length > limit):
            raise ValueError(f"max_length must be in 1..{limit} (the model's positions), got {max_length}")
        self.max_length = int(max_length)
        return self

    def set_rope_scaling(self, scaling: dict[str, Any]) -> Embedder:
        """Stretch a RoPE backbone's positions ({rope_type: linear | yarn, factor, optionally
        original_max_position_embeddings}, as a model card's config.json puts it), so `set_max_length` may go
        up to positions x factor; models with learned positions (BERT) are refused with the reason."""
        scale_rope(self.backbone, scaling)
        self.rope_scaling = dict(scaling)
        return self

    def set_reach(self, max_length: int | None, rope_scaling: dict[str, Any] | None) -> Embedder:
        """A job's `rope_scaling` and `max_length` (either None: the model's own), in the one order that
        works: the positions are stretched before the longer limit is checked against them."""
        if rope_scaling:
            self.set_rope_scaling(rope_scaling)
        return self.set_max_length(max_length) if max_length else self

    def set_attention(self, attention: str) -> Embedder:
        """causal | bidirectional (decoders only; an encoder is refused with the reason)."""
        self._mask_4d = families.set_attention(self.backbone, attention)
        self.attention = attention
        return self

    def keep_layers(self, layers: Sequence[int]) -> Embedder:
        """Keep only these transformer layers, in this order (a student initialised from a bigger
        model's layers, as EmbeddingGemma is); embeddings and pooling are kept as they are."""
        families.keep_layers(self.backbone, list(layers))
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
        self.frame = frame_id(r.numpy(), self.frame)
        return self.set_projection(r.T if old is None else r.T @ old)

    def calibrate_int8(
        self, texts: Sequence[str], widths: Sequence[int] = (), batch_size: int = 64
    ) -> dict[int, float]:
        """Set (and return) the int8 scales from the model's vectors of `texts`: full width and each of
        `widths` (vectors.calibrate_int8). Every later int8 code (encode, the batch job, the endpoint,
        eval) uses them; `save` keeps them in int8_scales.json."""
        if len(texts) < 2:
            raise ValueError(f"int8 calibration needs at least 2 texts, got {len(texts)}")
        vectors = self.encode(texts, batch_size=batch_size)
        self.int8_scales = calibrate_int8(vectors, [self.dim, *widths])
        return self.int8_scales

    def load_weights(
        self, state: dict[str, torch.Tensor], what: str = "the weights", partial: bool = False
    ) -> Embedder:
        """Load a state dict (e.g. consolidated from ZeRO shards), adding the projection layer it has if
        this model has none. Every weight must fit; unless `partial` (only what trained, e.g. LoRA
        adapters and the pooling head), every weight of the model must be given too."""
        if "projection.weight" in state and self.projection is None:
            self.set_projection(state["projection.weight"].float())
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or (not partial and [k for k in missing if "position_ids" not in k]):
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
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layers: Sequence[int] | None = None,
        prompt_length: torch.Tensor | None = None,
        normalize: bool = True,
        **_: torch.Tensor,
    ) -> torch.Tensor:
        """Pooled (and, if configured, unit-length) embeddings of a right-padded tokenized batch: [B, dim].

        `prompt_length` [B]: each row's prompt tokens, left out of pooling unless include_prompt.
        `layers` (training, 2D Matryoshka): also pool the output after each of these first-L-layer
        sub-models, which is what `keep_layers(range(L))` would give; returns [B, dim * (1 + len(layers))],
        the full model's embedding first, then one per entry of `layers`. `normalize=False`: the pooled
        vectors as they are (`encode` normalises them itself, in numpy, as every inference path does).
        (token_type_ids are not passed: single texts have all zeros, the encoders' own default.)
        """
        out = self.states(input_ids, attention_mask, output_hidden_states=bool(layers))
        keep = pool_mask(attention_mask, None if self.include_prompt else prompt_length)
        unit = self.normalize and normalize
        pooled = [self._pool(out.last_hidden_state, keep, unit)]
        if layers:
            n = len(out.hidden_states) - 1
            if any(not 1 <= k <= n for k in layers):
                raise ValueError(
                    f"layers must be in [1, {n}] (sub-models of the first L layers), got {list(layers)}"
                )
            pooled += [self._pool(out.hidden_states[k], keep, unit) for k in layers]
        return torch.cat(pooled, dim=1) if layers else pooled[0]

    def states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool = False
    ) -> Any:
        """The backbone's output for a right-padded batch (its token states, before pooling), with the
        attention the model is set to (a 4D mask where a decoder is made bidirectional without a switch)."""
        mask = attention_mask
        if self._mask_4d:
            impl = getattr(self.backbone.config, "_attn_implementation", "sdpa")
            mask = families.padding_mask_4d(attention_mask, impl, next(self.backbone.parameters()).dtype)
        return self.backbone(
            input_ids=input_ids, attention_mask=mask, output_hidden_states=output_hidden_states
        )

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor, normalize: bool) -> torch.Tensor:
        if self.latent is not None:
            hidden = self.latent(hidden.to(self.latent.latents.dtype))
        pooled = pool(self.pooling, hidden, mask)
        if self.projection is not None:
            pooled = self.projection(pooled.to(self.projection.weight.dtype)).float()
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def prompt_length(self, prompt: str) -> int:
        """Tokens a prompt takes at the start of a text: its tokens alone, less a trailing special
        token (EOS, [SEP]) — how sentence-transformers counts, so include_prompt=False agrees with it."""
        if prompt not in self._prompt_lengths:
            ids = self.tokenizer(prompt)["input_ids"]
            special = bool(ids) and ids[-1] in set(self.tokenizer.all_special_ids)
            self._prompt_lengths[prompt] = len(ids) - int(special)
        return self._prompt_lengths[prompt]

    def tokenize(self, texts: Sequence[Text]) -> dict[str, torch.Tensor]:
        """Padded tokens of texts, each a string or (prompt, text); the training path."""
        pairs = [t if isinstance(t, tuple) else ("", t) for t in texts]
        feats = dict(
            self.tokenizer(
                [p + t for p, t in pairs], padding=True, truncation=True, max_length=self.max_length,
                return_tensors="pt",
            )
        )  # fmt: skip
        if any(p for p, _ in pairs):
            feats["prompt_length"] = torch.tensor([self.prompt_length(p) if p else 0 for p, _ in pairs])
        return feats

    def embed_texts(self, texts: Sequence[Text]) -> torch.Tensor:
        """Differentiable embeddings of raw texts, each a string or (prompt, text) (the training path)."""
        feats = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        return self(**feats)

    def prompt(self, prompt_name: str | None) -> str:
        """The prefix a named prompt of the model (e.g. 'query') puts before texts; None: ''."""
        if prompt_name is None:
            return ""
        if prompt_name not in self.prompts:
            raise ValueError(
                f"unknown prompt_name {prompt_name!r}; this model has {sorted(self.prompts) or 'none'}"
            )
        return self.prompts[prompt_name]

    def tokenize_ids(self, texts: Sequence[str], prompt_name: str | None = None) -> Tokens:
        """Validate and tokenize (truncating to max_length) without padding: the CPU half of `encode`.

        Cut into `tokenize_threads` parts tokenized side by side; the result does not depend on it.
        """
        prompt = self.prompt(prompt_name)
        texts = [prompt + t for t in validate_texts(texts)]
        if not texts:
            return Tokens([], [])
        step = max(MIN_TOKENIZE_PART, -(-len(texts) // max(1, self.tokenize_threads)))
        parts = [texts[i : i + step] for i in range(0, len(texts), step)]
        if len(parts) == 1:
            done = [self._tokenize_part(parts[0])]
        else:
            with ThreadPoolExecutor(len(parts)) as pool:
                done = list(pool.map(self._tokenize_part, parts))
        lengths = [self.prompt_length(prompt)] * len(texts) if prompt and not self.include_prompt else None
        return Tokens([x for p in done for x in p.ids], [x for p in done for x in p.truncated], lengths)

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
        normalize: bool | None = None,
    ) -> np.ndarray:
        """Embed `texts` (or their `tokenize_ids`) -> array [n, dim] (float32, int8 or packed uint8 for binary).

        Texts are sorted by token length and cut into batches of at most `batch_size` rows and,
        if given, `max_tokens` padded tokens, so padding is small; the output keeps input order.
        `stats`, if given, accumulates `tokens` and `padded_tokens`; `prompt_name` picks one of the
        model's prompts (e.g. 'query') to prefix. `normalize`: unit-length vectors (default: as the model
        says); False gives the pooled vectors as they are (float32 only).
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        tokens = texts if isinstance(texts, Tokens) else self.tokenize_ids(texts, prompt_name)
        ids, lengths = tokens.ids, tokens.prompt_lengths
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        was_training = self.training
        self.eval()  # every submodule: one may train while this module does not (a fresh LoRA's dropout)
        pad_id = self.tokenizer.pad_token_id or 0
        for idx in length_batches([len(x) for x in ids], batch_size, max_tokens):
            input_ids, mask = pad_batch([ids[i] for i in idx], pad_id)
            prompt = torch.tensor([lengths[i] for i in idx]) if lengths else None
            feats = (input_ids.to(self.device), mask.to(self.device))
            out[idx] = self(*feats, prompt_length=prompt, normalize=False).cpu().numpy()
            if stats is not None:
                stats["tokens"] = stats.get("tokens", 0) + int(mask.sum())
                stats["padded_tokens"] = stats.get("padded_tokens", 0) + mask.numel()
        self.train(was_training)
        normalized = self.normalize if normalize is None else normalize
        if not normalized and precision != "float32":
            raise ValueError(f"precision {precision} quantises unit vectors: it needs normalize")
        return postprocess(unit(out) if normalized else out, dim, precision, normalized, self.int8_scales)
