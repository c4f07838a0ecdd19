"""Pooling kinds: token states [B, T, H] and a mask of the tokens to pool [B, T] -> one vector per text.

Name -> function through the plain dict `POOLINGS`. `latent_attention` (NV-Embed) is a trainable head
(latent_attention.py) whose output is mean-pooled; the others have no parameters. Every kind pools in
float32 whatever the model's dtype (bfloat16 sums lose digits), and works for right or left padding.
`pool_mask` leaves a prompt (instruction) out of the pooled tokens, as sentence-transformers'
`include_prompt: false` does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of the states of the masked-in tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def cls(hidden: Tensor, mask: Tensor) -> Tensor:
    """The first masked-in token's state (BERT's [CLS] with right padding)."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.int().argmax(1)]


def lasttoken(hidden: Tensor, mask: Tensor) -> Tensor:
    """The last real token's state (a decoder's summary of the whole text; with right padding that is
    the last 1 in the mask, with left padding the last position)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), (mask.bool() * positions).argmax(1)]


POOLINGS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mean": mean,
    "cls": cls,
    "lasttoken": lasttoken,
    "latent_attention": mean,  # over the latent-attention head's output
}


def pool_mask(attention_mask: Tensor, prompt_length: Tensor | None) -> Tensor:
    """The attention mask without each row's first `prompt_length` tokens (right padding), unless
    that would leave a row nothing to pool (a text that is all prompt keeps its tokens)."""
    if prompt_length is None:
        return attention_mask
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    out = attention_mask * (positions[None, :] >= prompt_length.to(attention_mask.device)[:, None])
    empty = out.sum(1) == 0
    return torch.where(empty[:, None], attention_mask, out)


def pool(kind: str, hidden: Tensor, mask: Tensor) -> Tensor:
    return POOLINGS[kind](hidden.float(), mask)
