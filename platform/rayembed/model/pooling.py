"""Pooling kinds: token states [B, T, H] and the attention mask [B, T] -> one vector per text [B, H].

Name -> function through the plain dict `POOLINGS`; every kind pools in float32 whatever the model's
dtype (bfloat16 sums lose digits).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


def mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of the states of real (unmasked) tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def cls(hidden: Tensor, mask: Tensor) -> Tensor:
    """The first token's state (BERT's [CLS])."""
    return hidden[:, 0]


POOLINGS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mean": mean, "cls": cls}


def pool(kind: str, hidden: Tensor, mask: Tensor) -> Tensor:
    return POOLINGS[kind](hidden.float(), mask)
