"""GradCache (Gao et al., 2021): contrastive batches larger than memory, with exact gradients.

1. Embed every tower (queries, positives, negatives, ...) chunk by chunk without autograd;
   only the [rows, dim] embeddings are kept, activations are freed chunk by chunk.
2. Compute the loss on the cached embeddings (leaf tensors; cross-worker gathers included) and
   backpropagate it to those embeddings only.
3. Re-embed each chunk with autograd and push the cached embedding gradients through it:
   `backward(sum(rep * rep.grad))` has the same parameter gradient as the full-batch loss.

Peak activation memory then follows the chunk, not the batch. The random state is captured before
each chunk's first pass and restored for its second, so dropout masks are identical in both passes.
`backward(surrogate, last)` is the caller's: under DeepSpeed it marks the accumulation boundary on
the last chunk and calls `engine.backward`; in plain torch it is `surrogate.backward()`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rayembed.model.batching import Text

Embed = Callable[[Sequence[Text]], Tensor]
LossOf = Callable[[list[Tensor]], Tensor]
Backward = Callable[[Tensor, bool], None]


class RandState:
    """The CPU (and, on CUDA, the device's) random state at construction; `restore()` puts it back."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def chunks(rows: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, rows)) for i in range(0, rows, size)]


def grad_cache_step(
    embed: Embed,
    towers: Sequence[Sequence[Text]],
    loss_of: LossOf,
    chunk: int,
    backward: Backward,
    device: torch.device | str = "cpu",
) -> Tensor:
    """One GradCache step over `towers` (equal-length text lists); returns the detached loss.

    `loss_of(reps)` gets one embedding matrix per tower (it may gather across workers);
    `backward` is called once per chunk, with `last=True` on the final one.
    """
    rows = len(towers[0])
    if any(len(t) != rows for t in towers):
        raise ValueError(f"towers must have equal lengths, got {[len(t) for t in towers]}")
    device = torch.device(device)
    parts = chunks(rows, chunk)
    states: list[RandState] = []
    cached: list[list[Tensor]] = [[] for _ in towers]
    with torch.no_grad():
        for part in parts:
            states.append(RandState(device))
            for reps, texts in zip(cached, towers, strict=True):
                reps.append(embed(texts[part]))
    leaves = [torch.cat(reps).detach().requires_grad_() for reps in cached]
    loss = loss_of(leaves)
    loss.backward()
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    for i, (part, state) in enumerate(zip(parts, states, strict=True)):
        state.restore()
        surrogate = sum(
            (torch.sum(embed(texts[part]) * grad[part]) for texts, grad in zip(towers, grads, strict=True)),
            torch.zeros((), device=device),
        )
        backward(surrogate, i == len(parts) - 1)
    return loss.detach()
