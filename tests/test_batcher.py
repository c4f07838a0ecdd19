"""TokenBatcher: token-budget batches, round-robin fairness, bounded queue, error isolation."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from rayembed.serve.batcher import Overloaded, TokenBatcher


class FakeModel:
    """Row i of the output is [first token id of input i, length]; records every batch."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[list[int]]] = []
        self.prompt_lengths: list[list[int] | None] = []
        self.fail_on = fail_on

    def __call__(self, ids: list[list[int]], prompt_lengths: list[int] | None = None) -> np.ndarray:
        self.batches.append(ids)
        self.prompt_lengths.append(prompt_lengths)
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


class Gated(FakeModel):
    """Holds each model call until `gate` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def __call__(self, ids: list[list[int]], prompt_lengths: list[int] | None = None) -> np.ndarray:
        self.batches.append(ids)
        self.gate.wait(10)
        return np.array([[x[0], len(x)] for x in ids], dtype=np.float32)


def test_an_idle_batch_waits_only_for_requests_on_their_way() -> None:
    model = FakeModel()

    async def go() -> float:
        b = TokenBatcher(model, dim=2, wait_s=5.0)  # a wait this long would time the test out
        loop = asyncio.get_running_loop()
        t = loop.time()
        await b.embed(_req(1, 1))  # nothing on its way: no wait
        alone = loop.time() - t

        async def late() -> np.ndarray:
            with b.arriving():  # e.g. being tokenized
                await asyncio.sleep(0.05)
            return await b.embed(_req(3, 1))

        await asyncio.gather(late(), b.embed(_req(2, 1)))
        return alone

    assert asyncio.run(go()) < 1.0
    assert [sorted(x[0] for x in batch) for batch in model.batches] == [[1000], [2000, 3000]]


def test_a_busy_models_next_batch_does_not_wait() -> None:
    model = Gated()

    async def go() -> None:
        b = TokenBatcher(model, dim=2, wait_s=5.0)
        first = asyncio.ensure_future(b.embed(_req(1, 1)))
        while not model.batches:  # the first request is inside the model
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(b.embed(_req(2, 1)))
        await asyncio.sleep(0.01)
        with b.arriving():  # a third is on its way when the model frees up: the second must not wait
            model.gate.set()
            await asyncio.wait_for(second, timeout=2.0)
        await first

    asyncio.run(go())
    assert [x[0][0] for x in model.batches] == [1000, 2000]


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


def test_prompt_lengths_travel_with_their_rows_into_merged_batches() -> None:
    model = FakeModel()

    async def go() -> None:
        b = TokenBatcher(model, dim=2, max_batch_inputs=16, wait_s=0.01)
        await asyncio.gather(b.embed(_req(1, 2), [3, 3]), b.embed(_req(2, 1)), b.embed(_req(3, 1), [5]))

    asyncio.run(go())
    [batch] = model.batches
    by_tag = {row[0] // 1000: n for row, n in zip(batch, model.prompt_lengths[0] or [], strict=True)}
    assert by_tag == {1: 3, 2: 0, 3: 5} and len(model.prompt_lengths[0] or []) == 4


def test_a_lone_request_takes_the_idle_model_and_arrivals_batch_after_it() -> None:
    from concurrent.futures import ThreadPoolExecutor

    model, gate = FakeModel(), threading.Event()
    threads: set[str] = set()

    def lone() -> str:
        threads.add(threading.current_thread().name)
        gate.wait(10)
        return "alone"

    async def go() -> tuple[str, list[np.ndarray]]:
        b = TokenBatcher(model, dim=2, wait_s=0, executor=ThreadPoolExecutor(1, thread_name_prefix="model"))
        assert b.idle
        first = asyncio.ensure_future(b.alone(lone))
        await asyncio.sleep(0.05)
        assert not b.idle
        later = [asyncio.ensure_future(b.embed(_req(t, 1))) for t in (2, 3)]
        await asyncio.sleep(0.05)
        assert model.batches == []  # queued behind the lone request, not run beside it
        gate.set()
        got = await asyncio.gather(*later)
        assert b.idle
        return await first, got

    result, rows = asyncio.run(go())
    assert result == "alone" and [int(r[0, 0]) for r in rows] == [2000, 3000]
    assert len(model.batches) == 1  # both arrivals went as one batch after it
    assert all(name.startswith("model") for name in threads)
