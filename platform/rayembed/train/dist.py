"""Cross-worker helpers for contrastive training (plain torch.distributed; gloo and nccl)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every worker's gradient for this worker's slice.

    Uses only all_gather + all_reduce, so it also runs on gloo (which lacks reduce_scatter).
    Every worker must pass the same number of rows.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """(rows of all workers, offset of this worker's rows); identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


def agree(every: bool, any_: bool = False, device: torch.device | str = "cpu") -> tuple[bool, bool]:
    """(every worker passed `every`, some worker passed `any_`), in one all_reduce.

    Lets workers stop together when a shard runs dry, and take the same decisions (e.g. when to
    report) from their own clocks.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return every, any_
    t = torch.tensor([int(every), -int(any_)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)  # min of -x is -(max of x): one op for both
    return bool(t[0].item() == 1), bool(t[1].item() == -1)
