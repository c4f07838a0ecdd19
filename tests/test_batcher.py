"""TokenBatcher: token-budget batches, round-robin fairness, bounded queue, error isolation."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from rayembed.batcher import Overloaded, TokenBatcher


class FakeModel:
    """Row i of the output is [first token id of input i, length]; records every batch."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[list[int]]] = []
        self.fail_on = fail_on

    def __call__(self, ids: list[list[int]]) -> np.ndarray:
        self.batches.append(ids)
        if self.fail_on is not None and any(x[0] == self.fail_on for x in ids):
            raise RuntimeError("model failed")
        return np.array([[x[0], len(x)] for x in ids], dtype=np.float32)


def _req(tag: int, n: int, length: int = 4) -> list[list[int]]:
    return [[tag * 1000 + i] + [0] * (length - 1) for i in range(n)]


def test_small_requests_share_the_first_batch_with_a_big_one() -> None:
    model = FakeModel()

    async def go() -> list[np.ndarray]:
        b = TokenBatcher(model, dim=2, max_batch_tokens=64, max_batch_inputs=16, wait_s=0.01)
        return await asyncio.gather(b.embed(_req(1, 100)), *(b.embed(_req(t, 1)) for t in range(2, 7)))

    big, *small = asyncio.run(go())
    first = {x[0] // 1000 for x in model.batches[0]}
    assert first == {1, 2, 3, 4, 5, 6}  # every 1-input request rides in the first model call
    np.testing.assert_array_equal(big[:, 0], [1000 + i for i in range(100)])  # rows back in order
    assert [int(s[0, 0]) for s in small] == [2000, 3000, 4000, 5000, 6000]
    for batch in model.batches:
        assert sum(len(x) for x in batch) <= 64 and len(batch) <= 16


def test_the_wait_window_is_only_waited_when_the_model_was_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    gate, waits = threading.Event(), []
    real_sleep = asyncio.sleep

    class Gated(FakeModel):
        def __call__(self, ids: list[list[int]]) -> np.ndarray:
            self.batches.append(ids)
            gate.wait(10)  # the first call holds the model until the second request has queued
            return np.array([[x[0], len(x)] for x in ids], dtype=np.float32)

    async def sleep(delay: float, *a: object) -> None:
        waits.append(delay)
        await real_sleep(delay)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    model = Gated()

    async def go() -> None:
        b = TokenBatcher(model, dim=2, wait_s=0.05)
        first = asyncio.ensure_future(b.embed(_req(1, 1)))
        while not model.batches:  # the first request is inside the model
            await real_sleep(0.001)
        second = asyncio.ensure_future(b.embed(_req(2, 1)))
        await real_sleep(0.01)
        gate.set()
        await asyncio.gather(first, second)

    asyncio.run(go())
    assert [x[0][0] for x in model.batches] == [1000, 2000]
    assert waits.count(0.05) == 1  # only before the first batch, not after the busy model call


def test_queue_is_bounded() -> None:
    async def go() -> None:
        b = TokenBatcher(FakeModel(), dim=2, max_queued_inputs=10, wait_s=0.05)
        first = asyncio.ensure_future(b.embed(_req(1, 8)))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await b.embed(_req(2, 3))
        assert (await first).shape == (8, 2)
        assert b.queued == 0

    asyncio.run(go())


def test_a_failing_batch_fails_only_its_requests() -> None:
    model = FakeModel(fail_on=2000)

    async def go() -> tuple[object, ...]:
        b = TokenBatcher(model, dim=2, max_batch_inputs=1, wait_s=0.0)
        return tuple(
            await asyncio.gather(
                b.embed(_req(1, 2)), b.embed(_req(2, 2)), b.embed(_req(3, 1)), return_exceptions=True
            )
        )

    ok, failed, later = asyncio.run(go())
    assert isinstance(failed, RuntimeError)
    assert isinstance(ok, np.ndarray) and ok.shape == (2, 2)
    assert isinstance(later, np.ndarray) and later[0, 0] == 3000
