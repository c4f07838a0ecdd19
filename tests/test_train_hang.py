"""Every worker runs the same collectives whatever its data, and a worker that waits too long in one fails
with the step, the phase and the collective named (rayembed.train.hang)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rayembed.model import Embedder
from rayembed.model.batching import by_length, length_batches, length_chunks, split_to
from rayembed.train.hang import CollectiveError, Watch, bound_collectives


def test_split_to_halves_the_biggest_piece_and_keeps_every_row_once() -> None:
    plan = length_batches([50, 3, 3, 3, 3, 3], batch_size=6, max_tokens=60)  # [50-row alone], [5 short]
    assert [len(p) for p in plan] == [1, 5]
    more = split_to(plan, 4)
    assert sorted(len(p) for p in more) == [1, 1, 2, 2]
    assert sorted(int(i) for p in more for i in p) == list(range(6))
    with pytest.raises(ValueError, match="cannot cut 6 rows into 7 forward passes"):
        split_to(plan, 7)


def test_agreed_pieces_give_the_rows_of_one_pass(tiny_model: Path) -> None:
    """A worker told to run more passes than its own plan needs (another worker's lengths need them)
    cuts its chunks further and still gets the rows of one padded pass."""
    model = Embedder.load(tiny_model, device="cpu").eval()
    feats = model.tokenize(["short one", "two words", "a much longer sentence " * 5, "tiny"])
    own = length_chunks(feats, max_tokens=10**6)
    assert len(own) == 1
    asked: list[int] = []
    agreed = length_chunks(feats, 10**6, pieces=lambda n: asked.append(n) or 3)
    assert asked == [1] and len(agreed) == 3
    with torch.no_grad():
        one = model(**feats)
        cut = by_length(lambda f: model(**f), feats, 10**6, pieces=lambda n: 4)
    torch.testing.assert_close(cut, one, atol=1e-5, rtol=1e-4)


def _diverge(rank: int, port: int, out: Path) -> None:
    """Rank 1 skips the all_gather rank 0 runs at step 7 (a group made after bound_collectives, as
    DeepSpeed's are), as workers with different pass counts do."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)  # torch's default wait: 30 min
    bound_collectives(2.0)
    group = dist.new_group([0, 1])
    watch = Watch(rank, 2.0)
    watch.at(7, "forward and backward")
    started = time.monotonic()
    try:
        if rank == 0:
            dist.all_gather([torch.zeros(2), torch.zeros(2)], torch.ones(2), group=group)
        else:
            time.sleep(5)
    except Exception as e:
        explained = watch.explain(e)
        got = [str(explained), time.monotonic() - started, isinstance(explained, CollectiveError)]
        (out / f"rank{rank}.json").write_text(json.dumps(got))
    assert watch.explain(ValueError("not a collective")) is None


def test_a_collective_that_waits_too_long_fails_naming_step_phase_and_collective(tmp_path: Path) -> None:
    """(Results come back in files: a fork-based multiprocessing Manager in a process that runs Ray broke
    its later calls to the local cluster.)"""
    from conftest import free_port

    mp.spawn(_diverge, args=(free_port(), tmp_path), nprocs=2, join=True)
    got = {int(p.stem[4:]): json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    message, waited, typed = got[0]
    assert typed and 2.0 <= waited < 5  # the bound, not torch's 30 min nor the peer's exit
    assert "rank 0, step 7, forward and backward: collective all_gather failed" in message
    assert "collective_timeout_s=2" in message
    assert 1 not in got


def test_the_watchdog_reports_a_run_whose_step_stopped(ray_local: None, caplog: Any) -> None:
    import ray

    from rayembed.train.hang import Board, Watchdog

    board: Any = ray.remote(Board).options(num_cpus=0).remote()
    ray.get(board.beat.remote(0, 11, "forward and backward", 123, "10.0.0.1"), timeout=60)
    ray.get(board.beat.remote(1, 12, "forward and backward", 456, "10.0.0.2"), timeout=60)
    with caplog.at_level(logging.WARNING, logger="rayembed.train"):
        watchdog = Watchdog(board, stall_s=1.0, poll_s=0.2)
        time.sleep(1.6)
        ray.get(board.failed.remote(0, "rank 0, step 12: ..."))
        stalls = watchdog.stop()
    assert ray.get(board.snapshot.remote())["failures"] == ["rank 0, step 12: ..."]
    ray.kill(board)
    [stall] = stalls
    assert "no step has finished for" in stall and "last step 12" in stall
    assert "rank 0: step 11, forward and backward" in stall and "pid 456 on 10.0.0.2" in stall
    assert stall in caplog.text


# --- end to end: ZeRO-3 + forward_tokens + GradCache, one worker's rows short, the other's long ---

SHORT, LONG = "a dog runs", " ".join(["the long sentence goes on and on"] * 12)


def _rows(n_steps: int, equal_steps: int, batch: int) -> list[dict[str, str]]:
    """Global batches of 2 x batch rows in file order (shuffle_buffer 0): the first `equal_steps` all
    short; after that worker 0's half short and worker 1's half long."""
    rows = []
    for step in range(n_steps):
        for half in (0, 1):
            text = LONG if step >= equal_steps and half == 1 else SHORT
            rows += [{"query": f"{text} q{step}{half}{i}", "positive": f"{text} p", "negative": f"{text} n"}
                     for i in range(batch)]  # fmt: skip
    return rows


def planted_loop(config: dict[str, Any]) -> None:
    """The train loop with two faults planted, one per attempt of the run:
    - the first attempt (no checkpoint yet) plans each worker's forward passes by its own lengths alone,
      as the code before the fix did: ranks with different lengths run different numbers of ZeRO-3 passes;
    - the attempt resumed from step 2 stalls worker 1 before step 5 (a worker stuck outside any collective)
      so worker 0 waits in step 5's first parameter gather;
    a later attempt runs the loop as it is."""
    import ray.train

    from rayembed.train import loop

    checkpoint, rank = ray.train.get_checkpoint(), ray.train.get_context().get_world_rank()
    if checkpoint is None:
        loop.most = lambda n, device="cpu": n  # type: ignore[attr-defined]
    else:
        with checkpoint.as_directory() as d:
            resumed = json.loads(Path(d, "history.json").read_text())[-1]["step"]
        step, original = [resumed], loop.backward_step
        if resumed == 2 and rank == 1:

            def stalled(*args: Any) -> Any:
                step[0] += 1
                if step[0] == 5:
                    time.sleep(3600)
                return original(*args)

            loop.backward_step = stalled  # type: ignore[attr-defined]
    loop.train_loop(config)


def test_zero3_ranks_with_different_lengths_agree_and_a_divergence_fails_then_resumes(
    ray_local: None, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.cloudpickle

    from rayembed.config import TrainConfig
    from rayembed.train import job, train
    from rayembed.train.order import global_batches, worker_slice

    data = tmp_path / "rows.jsonl"
    rows = _rows(n_steps=6, equal_steps=2, batch=4)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(
        data=str(data), output_dir=str(tmp_path / "run"), model=str(tiny_model), num_workers=2,
        zero_stage=3, negative_column="negative", batch_size=4, grad_cache_chunk=2, forward_tokens=64,
        max_length=64, shuffle_buffer=0, lr=1e-3, max_steps=6, checkpoint_every=2, max_failures=2,
        collective_timeout_s=10,
    )  # fmt: skip
    # Provably different plans: from step 3 on, worker 0's GradCache chunks are one forward pass per
    # tower, worker 1's two (a long row alone fills the 64-token budget).
    tokenizer = Embedder.load(tiny_model, device="cpu")
    batches = list(global_batches(iter([{k: np.array([r[k] for r in rows]) for k in rows[0]}]), 0, 8))
    for step, batch in enumerate(batches[2:], start=3):
        plans = []
        for rank in (0, 1):
            share = worker_slice(batch, rank, 2)
            assert share is not None
            feats = tokenizer.tokenize(list(share["query"][:2]))
            plans.append(len(length_batches(feats["attention_mask"].sum(1).tolist(), 2, 64)))
        assert plans == [1, 2], (step, plans)

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers import no test module
    monkeypatch.setattr(job, "train_loop", planted_loop)
    result = train(cfg)

    assert result["step"] == 6 and np.isfinite(result["loss"])
    assert result["resumed_from"] == 4  # the third attempt went on from the checkpoint before the stall
    # The first attempt's divergence: one worker's gloo aborts on a gather of the wrong size (or waits, as
    # jobs/distill.yaml did), the other's fails with the step named. The second attempt's stall: worker 0
    # waits in a ZeRO-3 gather for collective_timeout_s, then fails naming it.
    failures = result["worker_failures"]
    assert any("step 3, forward and backward: collective" in f for f in failures), failures
    [timeout] = [f for f in failures if "collective_timeout_s=10" in f]
    assert timeout.startswith("rank 0, step 5, forward and backward: collective "), timeout
    assert "Timed out waiting 10000ms" in timeout
    history = json.loads((tmp_path / "run" / "report" / "report.json").read_text())["history"]
    steps = [h["step"] for h in history]
    assert steps == [1, 2, 3, 4, 5, 6]
    from conftest import record

    record({"faults": {"train_zero3_divergence_then_stall": {
        "attempts": 3, "lost": 6 - len(set(steps)), "duplicated": len(steps) - len(set(steps)), "failed_requests": 0,
        "collective_timeout_s": cfg.collective_timeout_s, "resumed_from": result["resumed_from"]}}})  # fmt: skip
