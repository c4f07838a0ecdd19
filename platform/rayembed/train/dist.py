"""Cross-worker helpers (plain torch.distributed; gloo and nccl): gathers with gradients for contrastive
training, agreement between workers, and DeepSpeed's start on the process group Ray Train made."""

from __future__ import annotations

import os
import sys
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


def most(n: int, device: torch.device | str = "cpu") -> int:
    """The largest `n` of all workers (one all_reduce): e.g. how many forward passes each must run so
    that all run as many."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def import_deepspeed() -> Any:
    """`import deepspeed` without its autotuner's `import mlflow` (an optional import at DeepSpeed's
    import time, for a feature rayembed does not use: it doubled the import, 3.9 -> 1.9 s of every
    training worker's and export's start on 2 cores). mlflow imports as usual afterwards."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
        try:
            import deepspeed  # noqa: F401
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    return deepspeed


def init_deepspeed(use_gpu: bool) -> None:
    """DeepSpeed's communication over the process group Ray Train made (nccl on GPU, gloo on CPU).

    On CPU, DeepSpeed's backend would JIT-compile a shared-memory all-reduce op with g++ at every start
    on a new machine or install path (35-170 s on 2 cores, on the critical path of every worker: each
    clean clone, so each CI run, paid it). That op serves only DeepSpeed's `inference_all_reduce`
    (tensor-parallel inference), never a training step, so it is marked unavailable and gloo runs every
    collective.
    """
    os.environ["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"
    import_deepspeed()
    import deepspeed
    import deepspeed.ops

    if not use_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
