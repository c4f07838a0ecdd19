"""The rows each training worker reads (rayembed.train.order): one order per epoch, whatever the batch
boundaries of the stream and the number of workers, so a run resumed on fewer workers trains on every row
of the epoch exactly once."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from rayembed.train.order import epoch_order, global_batches, num_rows, rechunk, worker_slice


def stream(n: int, cuts: list[int]) -> Iterator[dict[str, np.ndarray]]:
    """Rows 0..n-1 (an id and a text column) in batches of the sizes in `cuts`, cycled."""
    start, k = 0, 0
    while start < n:
        size = cuts[k % len(cuts)]
        ids = np.arange(start, min(n, start + size))
        yield {"id": ids, "text": np.array([f"t{i}" for i in ids], dtype=object)}
        start, k = start + size, k + 1


def ids(batches: Iterator[dict[str, np.ndarray]]) -> list[int]:
    return [int(i) for b in batches for i in b["id"]]


def test_rechunk_cuts_exact_sizes_in_order() -> None:
    chunks = list(rechunk(stream(23, [5, 1, 7]), 4))
    assert [num_rows(c) for c in chunks] == [4, 4, 4, 4, 4, 3]
    assert ids(iter(chunks)) == list(range(23))
    assert all(list(c["text"]) == [f"t{i}" for i in c["id"]] for c in chunks)  # columns stay aligned


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch_not_by_batch_boundaries() -> None:
    a = ids(epoch_order(stream(100, [7]), 32, seed=3, epoch=0))
    b = ids(epoch_order(stream(100, [1, 50, 13]), 32, seed=3, epoch=0))
    assert a == b and sorted(a) == list(range(100)) and a != list(range(100))
    assert ids(epoch_order(stream(100, [7]), 32, seed=3, epoch=1)) != a  # a new order each epoch
    assert ids(epoch_order(stream(100, [7]), 0, seed=3, epoch=0)) == list(range(100))  # 0: file order
    # a window only mixes its own rows: the first 32 stay the first 32
    assert sorted(a[:32]) == list(range(32))


def train_epoch(n: int, batch: int, worlds: list[tuple[int, int]]) -> tuple[list[int], int]:
    """Rows each worker trains on over one epoch, where `worlds` = [(workers, steps), ...] says how many
    workers run for how many steps (None steps: to the end); each phase resumes at the saved row count,
    as the loop does after a restart. Returns every row trained on and the rows left out."""
    seen: list[int] = []
    row, left_out = 0, 0
    for world, steps in worlds:
        batches = global_batches(epoch_order(stream(n, [10]), 16, 0, 0), row, batch * world)
        for step, global_batch in enumerate(batches):
            if step == steps:
                break
            shares = [worker_slice(global_batch, r, world) for r in range(world)]
            if shares[0] is None:
                left_out += num_rows(global_batch)
                break
            seen += [int(i) for share in shares if share is not None for i in share["id"]]
            left_out += num_rows(global_batch) - sum(num_rows(s) for s in shares if s is not None)
            row += num_rows(global_batch)
    return seen, left_out


def test_an_epoch_resumed_on_fewer_workers_reads_every_row_exactly_once() -> None:
    fixed, _ = train_epoch(100, 4, [(2, -1)])
    assert sorted(fixed) == list(range(100))
    elastic, left_out = train_epoch(100, 4, [(2, 3), (1, 5), (4, -1)])  # 2 workers, a node lost, then 4
    assert sorted(elastic) == list(range(100)) and left_out == 0
    assert elastic == fixed  # the same rows in the same order, whatever the world sizes


def test_a_last_batch_smaller_than_the_world_is_left_out_and_counted() -> None:
    seen, left_out = train_epoch(26, 4, [(3, -1)])  # 2 global batches of 12, then 2 rows for 3 workers
    assert len(seen) == 24 and left_out == 2 and len(set(seen)) == 24


def test_every_worker_gets_as_many_rows_and_the_remainder_is_counted() -> None:
    """Gathers, GradCache chunks and ZeRO-3's forward passes need the same row count on every worker: a
    short last batch of 11 rows on 3 workers gives each 3, and the 11th row is left out, counted."""
    shares = [worker_slice({"id": np.arange(11)}, r, 3) for r in range(3)]
    assert [list(s["id"]) for s in shares if s is not None] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    seen, left_out = train_epoch(101, 4, [(2, -1)])  # 12 batches of 8, then 5 rows: 2 + 2, one left out
    assert len(seen) == len(set(seen)) == 100 and set(seen) <= set(range(101)) and left_out == 1
