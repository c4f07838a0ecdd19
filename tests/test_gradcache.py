"""GradCache gives the full-batch gradients: in plain torch, and under DeepSpeed ZeRO-2/3 on 2 Ray Train
workers with documents and negatives gathered across workers."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from rayembed.model import Embedder
from rayembed.train.gradcache import grad_cache_step
from rayembed.train.losses import InfoNCE

Q = [
    "a dog runs",
    "a cat sleeps",
    "rain falls",
    "two men talk",
    "a red car",
    "kids play",
    "the sun",
    "ice melts",
]
D = [
    "an animal moves",
    "a pet rests",
    "weather is wet",
    "people chat",
    "a vehicle",
    "children",
    "a star",
    "water",
]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_cache_equals_full_batch_in_torch(tiny_model: Path) -> None:
    model = Embedder.load(tiny_model, device="cpu").eval()  # eval: no dropout, so both runs see one function
    loss_fn = InfoNCE(scale=20.0)

    def embed(texts: Any) -> torch.Tensor:
        return model(**model.tokenize(list(texts)))

    def loss_of(reps: list[torch.Tensor]) -> torch.Tensor:
        return loss_fn(reps[0], reps[1]) + loss_fn(reps[0][:, :16], reps[1][:, :16])

    full = loss_of([embed(Q), embed(D)])
    full.backward()
    want = _grads(model)
    model.zero_grad()
    calls: list[bool] = []

    def backward(surrogate: torch.Tensor, last: bool) -> None:
        calls.append(last)
        surrogate.backward()

    loss = grad_cache_step(embed, [Q, D], loss_of, chunk=3, backward=backward)
    got = _grads(model)
    assert calls == [False, False, True]  # ceil(8 / 3) chunks, the last one marked
    assert torch.allclose(loss, full.detach(), atol=1e-6)
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-4), name


def test_grad_cache_replays_dropout_masks(tiny_model: Path) -> None:
    model = Embedder.load(tiny_model, device="cpu").train()  # dropout on
    seen: list[torch.Tensor] = []

    def embed(texts: Any) -> torch.Tensor:
        out = model(**model.tokenize(list(texts)))
        seen.append(out.detach().clone())
        return out

    grad_cache_step(
        embed, [Q], lambda reps: reps[0].pow(2).sum(), chunk=4, backward=lambda s, last: s.backward()
    )
    first, second = seen[:2], seen[2:]
    assert len(second) == 2
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)  # same masks in the cached pass and the gradient pass
    assert not torch.equal(seen[0], model(**model.tokenize(Q[:4])))  # dropout is really on


def _compare_worker(config: dict[str, Any]) -> None:
    """On each worker: the same global batch trained plainly and with GradCache, ZeRO-2 and ZeRO-3;
    reports the largest gradient and loss differences (max over workers)."""
    import ray.train
    import torch.distributed as dist

    from rayembed.config import TrainConfig
    from rayembed.train.dist import init_deepspeed

    init_deepspeed(use_gpu=False)  # DS_ACCELERATOR before deepspeed is imported
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from rayembed.train.loop import backward_step, deepspeed_config
    from rayembed.train.objective import objective

    rank = dist.get_rank()
    rows = slice(rank * 8, rank * 8 + 8)
    batch = {k: config["batch"][k][rows] for k in ("query", "positive", "negative")}
    out: dict[str, float] = {}
    for stage in (2, 3):
        grads, losses = [], []
        for chunk in (None, 2):
            cfg = TrainConfig(
                data="unused", output_dir="/tmp/unused", model=config["model"], zero_stage=stage,
                batch_size=8, grad_cache_chunk=chunk, negative_column="negative", matryoshka_dims=[32, 16],
            )  # fmt: skip
            model = Embedder.load(cfg.model, device="cpu")
            engine, *_ = deepspeed.initialize(
                model=model, model_parameters=model.parameters(), config=deepspeed_config(cfg)
            )
            engine.module.eval()
            losses.append(backward_step(engine, cfg, *objective(cfg, batch, None, torch.device("cpu"))))
            grads.append({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
        diff = max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0])
        scale = max(float(g.abs().max()) for g in grads[0].values())
        stats = torch.tensor([diff, float((losses[0] - losses[1]).abs()), -scale])
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        out |= {f"z{stage}_grad_diff": stats[0].item(), f"z{stage}_loss_diff": stats[1].item()}
        out[f"z{stage}_grad_scale"] = -stats[2].item()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "diff.json").write_text(json.dumps(out))
        ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(tmp))


@pytest.mark.usefixtures("ray_local")
def test_grad_cache_matches_full_batch_under_zero_2_and_3(
    tiny_model: Path, snli_triples: Path, tmp_path: Path
) -> None:
    import pandas as pd
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    rows = pd.read_json(snli_triples, lines=True).head(16)
    trainer = TorchTrainer(
        _compare_worker,
        train_loop_config={"model": str(tiny_model), "batch": {k: rows[k].tolist() for k in rows.columns}},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name="gradcache", storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as d:
        diff = json.loads(Path(d, "diff.json").read_text())
    for stage in (2, 3):
        assert diff[f"z{stage}_grad_scale"] > 1e-3  # real gradients, not zeros
        assert diff[f"z{stage}_grad_diff"] < 1e-5 * max(1.0, diff[f"z{stage}_grad_scale"]), diff
        assert diff[f"z{stage}_loss_diff"] < 1e-5, diff
