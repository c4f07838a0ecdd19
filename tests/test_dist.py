"""Negatives gathered across workers give the same gradients as one full batch on one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rayembed.train.dist import agree, gather_with_grad
from rayembed.train.losses import InfoNCE

B, D = 3, 8


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2 * B, D, generator=g), torch.randn(2 * B, D, generator=g)


def _worker(rank: int, port: int, out: dict[int, torch.Tensor]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    q_all, d_all = _data()
    q = q_all[rank * B : (rank + 1) * B].clone().requires_grad_()
    d = d_all[rank * B : (rank + 1) * B].clone().requires_grad_()
    docs, offset = gather_with_grad(d)
    loss = InfoNCE(scale=10.0)(q, docs, offset=offset)
    # Data-parallel convention: each worker's loss is its local mean; gradients are averaged over workers.
    (loss / 2).backward()
    out[rank] = torch.cat([q.grad, d.grad])  # type: ignore[list-item]
    assert agree(rank == 0, rank == 1) == (False, True)
    assert agree(True, False) == (True, False)
    dist.destroy_process_group()


def test_gathered_gradients_equal_full_batch() -> None:
    from conftest import free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
        grads = dict(out)
    q_all, d_all = _data()
    q, d = q_all.clone().requires_grad_(), d_all.clone().requires_grad_()
    InfoNCE(scale=10.0)(q, d).backward()
    for rank in (0, 1):
        rows = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(grads[rank], torch.cat([q.grad[rows], d.grad[rows]]))  # type: ignore[index]


INIT_DEEPSPEED = """
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
dist.init_process_group("gloo", rank=0, world_size=1)
from rayembed.train.dist import init_deepspeed
init_deepspeed(use_gpu=False)
import deepspeed.comm as ds_comm
t = torch.ones(3)
ds_comm.all_reduce(t)
print(ds_comm.comm.cdb.shm_comm_op is None, float(t.sum()), flush=True)
dist.destroy_process_group()  # as Ray Train does for its workers: no live group at interpreter exit
"""


def test_deepspeed_on_cpu_builds_no_op(tmp_path: Path) -> None:
    """init_deepspeed on CPU: DeepSpeed's collectives run on gloo without JIT-compiling its shared-memory
    all-reduce op (a g++ build of 35-170 s on 2 cores at every new install path). The child tears its
    process group down before it exits: once, in a fresh-clone CI run, a child that left it alive printed
    the right result and then aborted in interpreter teardown (`terminate called without an active
    exception`: a C++ thread object of the gloo group or its TCPStore destroyed while still joinable); 195
    runs here (45 three at a time, under a 2-core training load) did not abort again."""
    from conftest import free_port

    env = os.environ | {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    done = subprocess.run([sys.executable, "-c", INIT_DEEPSPEED.format(port=free_port())], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["True", "3.0"]
    assert not (tmp_path / "ext").exists()  # nothing was built


def test_deepspeed_imports_without_mlflow_and_mlflow_imports_after() -> None:
    """DeepSpeed's autotuner imports mlflow when it can (1.6 s of each worker's start); import_deepspeed
    keeps it out, and mlflow (the tracking backend) still imports in the same process afterwards."""
    code = (
        "import sys; from rayembed.train.dist import import_deepspeed; ds = import_deepspeed(); "
        "assert hasattr(ds, 'initialize') and 'mlflow' not in sys.modules, sorted(sys.modules)[:5]; "
        "import mlflow; print(mlflow.__version__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].split(".")[0] == "3"  # mlflow 3.x
