"""Which rows each worker trains on: one global order per epoch, so that a run resumed on another number
of workers (elastic training after a node loss) still trains on every row of an epoch exactly once.

Every worker reads the whole training set in the same order (Ray Data with `preserve_order`; Ray Train
splits nothing, see `ingest_config`), permutes it the same way (seeded windows of `shuffle_buffer` rows,
a new permutation each epoch) and cuts it into global batches of world_size x batch_size rows; worker r
trains on the r-th slice of each. The position in an epoch is a row count (`row_in_epoch`, saved in every
checkpoint), independent of the number of workers. The last global batch of an epoch may be short: every
worker still gets as many rows as the others (their gathers, GradCache chunks and, under ZeRO-3, forward
passes must match), so its last `rows % workers` rows are left out and counted (`rows_left_out` in the
run's metrics).

The cost: each worker reads every row's columns (text, and teacher vectors for distillation), not just
its share; they are small next to the model's work on them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


def ingest_config() -> Any:
    """Ray Train's DataConfig for this order: the dataset is not split, and its rows come in order."""
    import copy

    import ray.train
    from ray.data import DataContext

    options = copy.deepcopy(DataContext.get_current().execution_options)  # the driver's, as Train's default
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=[], execution_options=options)


def num_rows(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def _cut(batch: Batch, lo: int, hi: int) -> Batch:
    return {k: v[lo:hi] for k, v in batch.items()}


def rechunk(stream: Iterable[Batch], size: int) -> Iterator[Batch]:
    """The rows of `stream` in chunks of exactly `size` rows (the last one may be shorter)."""
    parts: list[Batch] = []
    held = 0
    for batch in stream:
        parts.append(batch)
        held += num_rows(batch)
        if held < size:
            continue
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        start = 0
        while held - start >= size:
            yield _cut(merged, start, start + size)
            start += size
        parts, held = [_cut(merged, start, held)], held - start
    if held:
        yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def epoch_order(stream: Iterable[Batch], window: int, seed: int, epoch: int) -> Iterator[Batch]:
    """The epoch's rows: consecutive windows of `window` rows, each permuted by (seed, epoch, window
    index), so the order depends on the data and the seeds only (0: the data's own order)."""
    if window <= 1:
        yield from stream
        return
    for k, chunk in enumerate(rechunk(stream, window)):
        perm = np.random.default_rng([seed, epoch, k]).permutation(num_rows(chunk))
        yield {c: v[perm] for c, v in chunk.items()}


def global_batches(rows: Iterable[Batch], start_row: int, size: int) -> Iterator[Batch]:
    """Global batches of `size` rows from row `start_row` of the epoch on (the last may be shorter)."""

    def after_start() -> Iterator[Batch]:
        skipped = 0
        for batch in rows:
            n = num_rows(batch)
            if skipped + n <= start_row:
                skipped += n
                continue
            yield _cut(batch, max(0, start_row - skipped), n)
            skipped = start_row

    return rechunk(after_start(), size)


def worker_slice(batch: Batch, rank: int, world: int) -> Batch | None:
    """Worker `rank`'s contiguous share of a global batch, the same number of rows for every worker (the
    last `rows % world` rows are no one's); None if it has fewer rows than workers."""
    share = num_rows(batch) // world
    if share == 0:
        return None
    return _cut(batch, share * rank, share * (rank + 1))
