"""Tokenizers of every family made to behave alike: right padding, a pad token, and for last-token pooling
a sequence that ends in EOS.

Right padding everywhere: real tokens then sit at positions 0..n-1 whatever the batch, so a decoder
(whose rotary positions count from the left) gives a text the same vector alone or in a batch. Llama and
Mistral tokenizers have no pad token: EOS stands in (pads are masked out). Last-token pooling reads the
state of the final token, which must be EOS (Qwen3-Embedding, E5-Mistral): where the tokenizer does not
append it, its post-processor is set to, so the saved tokenizer appends it too and sentence-transformers,
TEI and vLLM tokenize as rayembed does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def ends_special(tokenizer: Any) -> bool:
    """Does the tokenizer end every sequence with a special token (EOS, or BERT's [SEP])?"""
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[-1] in set(tokenizer.all_special_ids)


def prepare_tokenizer(tokenizer: Any, pooling: str) -> Any:
    """Right padding, a pad token, and EOS at the end for `lasttoken`; clear errors where impossible."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token: cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    if pooling == "lasttoken" and not ends_special(tokenizer):
        append_eos(tokenizer)
    return tokenizer


def append_eos(tokenizer: Any) -> None:
    """Make the tokenizer's post-processor append EOS (keeping a leading BOS if it adds one)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "lasttoken pooling needs the text to end in an EOS token, and this tokenizer has none; "
            "use mean pooling or a tokenizer with an EOS token"
        )
    if not hasattr(type(tokenizer), "add_eos_token"):
        raise ValueError(f"cannot make a {type(tokenizer).__name__} append EOS: use a fast tokenizer")
    ids = tokenizer("a")["input_ids"]
    tokenizer.add_bos_token = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    tokenizer.add_eos_token = True
    if tokenizer("a")["input_ids"][-1] != tokenizer.eos_token_id:
        raise ValueError(f"could not make {type(tokenizer).__name__} append its EOS token")


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """`save_pretrained`, with tokenizer_config.json agreeing with what the tokenizer does now (a saved
    `add_eos_token: false` would otherwise rebuild the post-processor without EOS on load)."""
    tokenizer.save_pretrained(out)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config["padding_side"] = "right"
    for key in ("add_bos_token", "add_eos_token"):
        if key in config:
            config[key] = bool(getattr(tokenizer, key))
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
