"""Random-weight models of real backbone families, at tiny or real sizes, built offline in seconds.

For tests (every family's code path on CPU), benchmarks (real shapes: memory, tokens/s, MFU) and CPU
smoke runs of LLM recipes, where the real weights are not at hand and nothing may come from a hub.
The vectors mean nothing; the compute per token and the code paths are the family's own. Tokenizers
are stand-ins: a byte-level BPE trained here on the bundled MiniLM's vocabulary words, with the
family's special tokens and whether it adds BOS (Llama, Mistral, Gemma) or not (Qwen) and has a pad
token (Qwen, Gemma) or not (Llama, Mistral), which is what padding and EOS handling depend on.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

FAMILIES: dict[str, dict[str, Any]] = {
    # config class, special tokens, whether the tokenizer prepends BOS
    "llama": {"config": "LlamaConfig", "bos": "<s>", "eos": "</s>", "pad": None, "add_bos": True},
    "mistral": {"config": "MistralConfig", "bos": "<s>", "eos": "</s>", "pad": None, "add_bos": True},
    "qwen2": {
        "config": "Qwen2Config",
        "bos": None,
        "eos": "<|endoftext|>",
        "pad": "<|endoftext|>",
        "add_bos": False,
    },
    "qwen3": {
        "config": "Qwen3Config",
        "bos": None,
        "eos": "<|endoftext|>",
        "pad": "<|endoftext|>",
        "add_bos": False,
    },
    "gemma": {"config": "GemmaConfig", "bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "add_bos": True},
    "gemma3": {"config": "Gemma3TextConfig", "bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "add_bos": True},
}
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512},
    # Qwen2-0.5B's shape (494M parameters with its 151,936-token vocabulary); saved in bfloat16 as the
    # real checkpoint is
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 32768, "vocab_size": 151936,
             "tie_word_embeddings": True, "dtype": "bfloat16"},
}  # fmt: skip
# tiny with 32k positions: a long-context stand-in (whole documents of 20k tokens, no chunking)
SIZES["tiny-long"] = SIZES["tiny"] | {"max_position_embeddings": 32768}
# Qwen2-0.5B's layers with a 32,000-token vocabulary (387M parameters): where the 0.5B shape's data
# parallel baseline does not fit two workers in memory (the memory benchmark)
SIZES["0.4b"] = SIZES["0.5b"] | {"vocab_size": 32000}
# tiny whose weights are mostly a 1.2M-row token embedding (~310 MB): heavy to hold, cheap to run (a model
# larger than a driver's memory limit, in seconds)
SIZES["tiny-heavy"] = SIZES["tiny"] | {"vocab_size": 1_200_000}
BPE_VOCAB = 8192


@functools.cache
def _bpe() -> str:
    """A byte-level BPE (as a tokenizer.json string) trained on the bundled MiniLM's vocabulary words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rayembed.model.layout import default_model_path

    words = json.loads((default_model_path() / "tokenizer.json").read_text())["model"]["vocab"]
    text = [w for w in words if w.isalpha()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([" " + w for w in text], trainer=trainer)
    return tok.to_str()


def stand_in_tokenizer(family: str, max_length: int = 512) -> Any:
    """The family's special tokens and BOS behaviour over the stand-in byte-level BPE."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    f = FAMILIES[family]
    tok = Tokenizer.from_str(_bpe())
    tok.add_special_tokens(list(dict.fromkeys(t for t in (f["bos"], f["eos"], f["pad"]) if t)))
    bos = [(f["bos"], tok.token_to_id(f["bos"]))] if f["add_bos"] else []
    tok.post_processor = processors.TemplateProcessing(
        single=f"{f['bos']} $A" if bos else "$A",
        pair=f"{f['bos']} $A $B" if bos else "$A $B",
        special_tokens=bos,
    )
    names = {f"{k}_token": f[k] for k in ("bos", "eos", "pad") if f[k]}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **names)


def build_random_model(
    family: str, path: str | Path, size: str = "tiny", seed: int = 0, name: str | None = None, **settings: Any
) -> Path:
    """Write a random-weight `family` model of `size` to `path` as rayembed saves models (decoders pool
    by their last token unless `settings` say otherwise: pooling (and num_latents, heads, mlp_ratio for
    latent_attention), attention, and the Embedder's own: max_length, prompts, include_prompt, ...)."""
    import torch
    import transformers

    from rayembed.model.embedder import Embedder

    if family not in FAMILIES or size not in SIZES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)} and size one of {sorted(SIZES)}")
    tokenizer = stand_in_tokenizer(family, SIZES[size]["max_position_embeddings"])
    shape = {"vocab_size": len(tokenizer)} | SIZES[size]
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    config = getattr(transformers, FAMILIES[family]["config"])(**shape, **ids)
    torch.manual_seed(seed)
    dtype = getattr(torch, str(shape.get("dtype", "float32")))
    backbone = transformers.AutoModel.from_config(config, attn_implementation="sdpa", dtype=dtype)
    pooling, attention = settings.pop("pooling", "lasttoken"), settings.pop("attention", None)
    latent = {k: settings.pop(k) for k in ("num_latents", "heads", "mlp_ratio") if k in settings}
    model = Embedder(backbone, tokenizer, name=name or f"random-{family}-{size}", **settings)
    model.set_pooling(pooling, **latent)
    if attention:
        model.set_attention(attention)
    return model.save(path)
