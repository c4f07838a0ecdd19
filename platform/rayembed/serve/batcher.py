"""Dynamic batching by a token budget, fair across requests (asyncio; no Ray here).

Requests queue their token ids; one loop takes inputs round-robin across the waiting requests (one
input from each in turn) until the batch holds `max_batch_tokens` tokens or `max_batch_inputs` inputs,
runs the model once in a worker thread (`executor`: the engine's one model thread), and hands
every request its rows as soon as all of them are done. When the model was idle, a batch waits up to `wait_s` for requests the handler has marked as
`arriving()` (being parsed and tokenized) and no longer; inputs that queued during a model call form the
next batch at once. So a 2,000-input request and many 1-input requests share each model call instead of
queueing behind each other, and the queue is bounded: beyond `max_queued_inputs` a request is refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")


class Overloaded(Exception):
    """The queue is full; the caller should answer 429."""


@dataclass
class _Job:
    ids: list[list[int]]
    future: asyncio.Future[np.ndarray]
    out: np.ndarray
    prompt_lengths: list[int] | None = None
    next: int = 0
    done: int = 0
    failed: bool = False


class TokenBatcher:
    def __init__(
        self,
        encode: Callable[[list[list[int]], list[int] | None], np.ndarray],
        dim: int,
        max_batch_tokens: int = 16384,
        max_batch_inputs: int = 256,
        wait_s: float = 0.005,
        max_queued_inputs: int = 16384,
        on_batch: Callable[[int, int], None] | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.encode, self.dim, self.executor = encode, dim, executor
        self.max_batch_tokens, self.max_batch_inputs = max_batch_tokens, max_batch_inputs
        self.wait_s, self.max_queued_inputs = wait_s, max_queued_inputs
        self.on_batch = on_batch
        self.jobs: deque[_Job] = deque()
        self.queued = 0
        self.incoming = 0  # requests on their way in (see `arriving`)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.running = False  # a batch is in the model
        self.solo = False  # a lone request is (see `alone`)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing in the model."""
        return not self.jobs and not self.running and not self.solo

    async def alone(self, work: Callable[[], T]) -> T:
        """Run `work` (a whole request: tokenize and encode) on the executor now, as the model's only
        call: a request that finds the model `idle` takes one thread hop instead of three. Requests that
        arrive meanwhile queue, and go as the next batch when it is done."""
        self.solo = True
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, work)
        finally:
            self.solo = False
            if self.jobs and self._wake is not None:
                self._wake.set()

    async def embed(self, ids: list[list[int]], prompt_lengths: list[int] | None = None) -> np.ndarray:
        """Float32 embeddings [len(ids), dim] of one request's token ids. `prompt_lengths`: each row's
        prompt tokens, which pooling leaves out; they travel with their rows into merged batches."""
        if self.queued + len(ids) > self.max_queued_inputs:
            raise Overloaded(f"{self.queued} inputs queued; limit {self.max_queued_inputs}")
        loop = asyncio.get_running_loop()
        job = _Job(ids, loop.create_future(), np.empty((len(ids), self.dim), np.float32), prompt_lengths)
        self.jobs.append(job)
        self.queued += len(ids)
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop())
        assert self._wake is not None
        self._wake.set()
        return await job.future

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark one request as on its way (parsing, tokenizing): an idle batch waits for it, up to wait_s."""
        self.incoming += 1
        try:
            yield
        finally:
            self.incoming -= 1

    async def _wait_for_arrivals(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while self.incoming and loop.time() < deadline:
            await asyncio.sleep(min(0.0005, self.wait_s))

    def take(self) -> list[tuple[_Job, int]]:
        """The next batch: inputs round-robin across requests within the token and input budgets."""
        batch: list[tuple[_Job, int]] = []
        tokens = 0
        while True:
            progressed = False
            for job in self.jobs:
                if job.next >= len(job.ids) or job.failed or job.future.cancelled():
                    continue
                n = len(job.ids[job.next])
                if batch and (tokens + n > self.max_batch_tokens or len(batch) >= self.max_batch_inputs):
                    return self._prune(batch)
                batch.append((job, job.next))
                job.next += 1
                tokens += n
                progressed = True
            if not progressed:
                return self._prune(batch)

    def _prune(self, batch: list[tuple[_Job, int]]) -> list[tuple[_Job, int]]:
        """Drop fully scheduled requests, and failed or abandoned ones with their unscheduled inputs."""
        keep: deque[_Job] = deque()
        for job in self.jobs:
            if job.failed or job.future.cancelled():
                self.queued -= len(job.ids) - job.next
                job.next = len(job.ids)
            elif job.next < len(job.ids):
                keep.append(job)
        self.jobs = keep
        return batch

    async def _loop(self) -> None:
        assert self._wake is not None
        idle = True
        while True:
            await self._wake.wait()
            if self.solo:  # a lone request has the model; `alone` wakes this loop when it is done
                self._wake.clear()
                continue
            if self.wait_s and idle:  # the model was idle: let requests on their way join this batch
                await self._wait_for_arrivals()
            batch = self.take()  # after a model call: what queued meanwhile goes at once
            if not batch:
                self._wake.clear()
                idle = True
                continue
            idle = False
            ids = [job.ids[i] for job, i in batch]
            lengths = [job.prompt_lengths[i] if job.prompt_lengths else 0 for job, i in batch]
            self.queued -= len(batch)
            self.running = True
            try:
                emb = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.encode, ids, lengths if any(lengths) else None
                )
            except Exception as e:  # every request in this batch fails; the others go on
                for job, _ in batch:
                    job.failed = True
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            finally:
                self.running = False
            if self.on_batch:
                self.on_batch(len(ids), sum(len(x) for x in ids))
            for (job, i), vec in zip(batch, emb, strict=True):
                job.out[i] = vec
                job.done += 1
                if job.done == len(job.ids) and not job.future.done():
                    job.future.set_result(job.out)
